"""data.shards: a training stream of S virtual shards that a run on any process count dividing S continues
exactly, with one iterator state per shard in each checkpoint.

The reference stream is built with the one-shard-per-process API of before data.shards
(data.train_batches(corpus, tok, config, p, 4) for p = 0..3, each process's rows concatenated in process
order): what 4 processes read, each packing its own share."""

import json
import os

import numpy as np
import pytest
from etils import epath
from grain._src.core import sharding as grain_sharding

from conftest import ByteTokenizer, tiny_test_config
from llama_jax import checkpoint as ckpt_lib
from llama_jax import corpus as corpus_lib
from llama_jax import data as data_lib
from llama_jax.errors import ConfigError
from test_data import _data_config, _documents, _write_jsonl

TOK = ByteTokenizer()
S = 4


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
  """A jsonl:, a text:, a parquet: corpus and a mix: of a JSONL and a Parquet one (an IterDataset mix)."""
  root = tmp_path_factory.mktemp("shard_corpora")
  rng = np.random.default_rng(1)
  _write_jsonl(root / "jsonl", _documents(rng, 50, "j"))
  os.makedirs(root / "text")
  for i, d in enumerate(_documents(rng, 24, "t")):
    (root / "text" / f"{i:02d}.txt").write_text(d, encoding="utf-8")
  import pyarrow as pa
  import pyarrow.parquet as pq
  os.makedirs(root / "parquet")
  docs = _documents(rng, 30, "p")
  for f in range(5):
    pq.write_table(pa.table({"text": docs[f * 6:(f + 1) * 6]}), root / "parquet" / f"{f}.parquet", row_group_size=3)
  jsonl, parquet = f"jsonl:{root}/jsonl/*.jsonl", f"parquet:{root}/parquet/*.parquet#text"
  return {"jsonl": jsonl, "text": f"text:{root}/text/*.txt", "parquet": parquet,
          "mix": f"mix:{jsonl}=0.6,{parquet}=0.4"}


def _corpus(spec):
  return corpus_lib.open_corpus(spec)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _reference(spec, config, steps):
  """The global batches of 4 processes, each reading its share as it did before data.shards."""
  shares = [iter(data_lib.train_batches(_corpus(spec), TOK, config, p, S)) for p in range(S)]
  batches = [{k: np.concatenate([b[k] for b in local]) for k in local[0]}
             for local in zip(*[_take(it, steps) for it in shares])]
  for it in shares:
    it.close()
  return batches


def _assert_same(got, want, what):
  assert len(got) == len(want), what
  for i, (g, w) in enumerate(zip(got, want)):
    assert sorted(g) == sorted(w), what
    for k in w:
      assert g[k].dtype == w[k].dtype and g[k].tobytes() == w[k].tobytes(), (what, i, k)


def _save(workdir, step, processes, config, stream):
  """Saves step `step` as `processes` (one data.ShardedBatches each) would: process 0 through the real
  Checkpointer (state, config, stream and its own shards), every other one its own shards through the
  same handler into the same step's data directory, as orbax has each process do."""
  checkpointer = ckpt_lib.Checkpointer(workdir, tiny_test_config().train)
  checkpointer.save(step, {"step": np.int32(step)}, tiny_test_config(**{"data.shards": config.shards}),
                    processes[0], stream, force=True)
  checkpointer.wait()
  checkpointer.close()
  data_dir = epath.Path(ckpt_lib.checkpoint_dir(workdir)) / str(step) / "data"
  for it in processes[1:]:
    ckpt_lib.DataShardsHandler().save(data_dir, ckpt_lib.DataSave(it.shard_states(), it.shard_count))


def _resume(workdir, spec, config, process_count):
  """The ShardedBatches of `process_count` processes, each moved to the newest checkpoint's position
  by the real Checkpointer, with the shard count the run takes from that checkpoint (data.shards = 0)."""
  step, stream = ckpt_lib.newest_stream(workdir)
  shards = data_lib.data_shards(config, process_count, stream, step)
  assert data_lib.stream_changes(stream, data_lib.stream_definition(config, shards)) == []
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  processes = [checkpointer.restore_data(step, data_lib.process_batches(_corpus(spec), TOK, config, shards, p,
                                                                        process_count))
               for p in range(process_count)]
  checkpointer.close()
  return processes


def _global_steps(processes, n):
  """n global batches: each process's local batch, concatenated in process order."""
  out = []
  for _ in range(n):
    local = [next(it) for it in processes]
    out.append({k: np.concatenate([b[k] for b in local]) for k in local[0]})
  return out


@pytest.mark.parametrize("kind", ["jsonl", "mix", "text", "parquet"])
def test_four_then_two_then_one_process_read_the_stream_of_four(specs, kind, tmp_path, monkeypatch):
  monkeypatch.setattr(corpus_lib, "PARQUET_SHUFFLE_WINDOW", 16)  # not 10,000 rows of 6-row files per shard first
  k, m, rest = 3, 4, 3
  reference = _reference(specs[kind], _data_config(), k + m + rest)
  config = _data_config(shards=S)
  workdir = str(tmp_path / "run")
  four = [data_lib.process_batches(_corpus(specs[kind]), TOK, config, S, p, 4) for p in range(4)]
  got = _global_steps(four, k)
  _save(workdir, k, four, config, data_lib.stream_definition(config, S))
  for it in four:
    next(it)  # reading on after the save does not move the saved position
    it.close()
  saved = sorted(f for f in os.listdir(f"{workdir}/checkpoints/{k}/data") if f.endswith(".json"))
  assert saved == [f"shard-0000{s}-of-00004.json" for s in range(S)]

  config = _data_config(shards=0)  # a resume takes the checkpoint's shard count
  two = _resume(workdir, specs[kind], config, 2)
  assert [it.shards for it in two] == [[0, 1], [2, 3]]
  got += _global_steps(two, m)
  _save(workdir, k + m, two, config, data_lib.stream_definition(config, S))
  for it in two:
    it.close()

  one = _resume(workdir, specs[kind], config, 1)
  got += _global_steps(one, rest)
  one[0].close()
  _assert_same(got, reference, kind)


def test_one_shard_per_process_is_the_stream_of_before(specs, monkeypatch):
  """data.shards = P: each process's batches and iterator state are those train_batches gave it."""
  monkeypatch.setattr(corpus_lib, "PARQUET_SHUFFLE_WINDOW", 16)
  config = _data_config()
  for p in range(2):
    before = iter(data_lib.train_batches(_corpus(specs["mix"]), TOK, config, p, 2))
    now = data_lib.process_batches(_corpus(specs["mix"]), TOK, config, data_lib.data_shards(config, 2), p, 2)
    assert now.shards == [p]
    _assert_same(_take(now, 4), _take(before, 4), p)
    assert json.dumps(now.shard_states()[p]) == json.dumps(before.get_state())
    before.close()
    now.close()


def _old_checkpoint(workdir, spec, config, steps, process_count, monkeypatch):
  """A step saved as before data.shards: grain's CheckpointHandler (process_<i>-of-<P>.json, written by
  each process; process i > 0 is played by patching grain's process index) and "process_count" in the
  stream definition. Returns the batches each process read next."""
  import grain
  import orbax.checkpoint as ocp
  its = [iter(data_lib.train_batches(_corpus(spec), TOK, config, p, process_count)) for p in range(process_count)]
  for it in its:
    _take(it, steps)
  fields = data_lib.STREAM_FIELDS
  stream = {**{f"data.{k}": config[k] for k in fields}, "process_count": process_count}
  handlers = {"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
              "data": grain.checkpoint.CheckpointHandler(), "stream": ocp.JsonCheckpointHandler()}
  manager = ocp.CheckpointManager(ckpt_lib.checkpoint_dir(workdir), item_handlers=handlers,
                                  options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
  config_dict = tiny_test_config().to_dict()
  del config_dict["data"]["shards"]  # the config of before the key
  data_dir = epath.Path(ckpt_lib.checkpoint_dir(workdir)) / str(steps) / "data"
  with monkeypatch.context() as patch:
    patch.setattr(grain_sharding, "get_process_index_and_count", lambda: (0, process_count))
    manager.save(steps, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave({"step": np.int32(steps)}), config=ocp.args.JsonSave(config_dict),
        data=grain.checkpoint.CheckpointSave(its[0]), stream=ocp.args.JsonSave(stream)))
    manager.wait_until_finished()
    manager.close()
    for p in range(1, process_count):
      patch.setattr(grain_sharding, "get_process_index_and_count", lambda p=p: (p, process_count))
      grain.checkpoint.CheckpointHandler().save(data_dir, args=grain.checkpoint.CheckpointSave(its[p]))
  saved = sorted(f for f in os.listdir(data_dir) if f.endswith(".json"))
  assert saved == [f"process_{p}-of-{process_count}.json" for p in range(process_count)]
  nexts = [_take(it, 3) for it in its]
  for it in its:
    it.close()
  return nexts


def test_a_checkpoint_saved_before_data_shards_resumes(specs, tmp_path, monkeypatch):
  config = _data_config()  # data.shards = 0
  for old_count in (1, 2):
    workdir = str(tmp_path / f"old{old_count}")
    nexts = _old_checkpoint(workdir, specs["jsonl"], config, 4, old_count, monkeypatch)
    # The same process count (each process its file), and for 2 old processes one process reading both.
    for count in sorted({old_count, 1}):
      processes = _resume(workdir, specs["jsonl"], config, count)
      assert sum(len(it.shards) for it in processes) == old_count
      want = [{k: np.concatenate([b[k] for b in local]) for k in local[0]} for local in zip(*nexts)]
      _assert_same(_global_steps(processes, 3), want, (old_count, count))
      for it in processes:
        it.close()


def test_a_process_count_that_does_not_divide_the_shards_stops_with_one_line():
  saved = data_lib.stream_definition(_data_config(shards=4), 4)
  with pytest.raises(ConfigError) as e:
    data_lib.data_shards(_data_config(), 3, saved, 8)
  assert str(e.value) == ("config.data.shards=4 (saved in checkpoint 8): a run on 3 processes cannot read it; "
                          "use 1, 2 or 4 processes")
  with pytest.raises(ConfigError) as e:  # the same for an explicit value on a new run
    data_lib.data_shards(_data_config(shards=6, batch_size=12), 4)
  assert str(e.value) == "config.data.shards=6: a run on 4 processes cannot read it; use 1, 2, 3 or 6 processes"
  with pytest.raises(ConfigError, match=r"^config.data.batch_size=8 is not divisible by the 3 data shards of config.data.shards=3$"):
    data_lib.data_shards(_data_config(shards=3), 1)
  old = {**data_lib.stream_definition(_data_config(), 2)}
  old["process_count"] = old.pop("data.shards")  # saved before data.shards: 2 processes were 2 shards
  assert data_lib.data_shards(_data_config(), 1, old, 5) == 2
  with pytest.raises(ConfigError, match=r"^config.data.shards=2 \(saved in checkpoint 5\): a run on 4 processes"):
    data_lib.data_shards(_data_config(), 4, old, 5)
  assert data_lib.data_shards(_data_config(batch_size=12), 3) == 3  # a new run: the process count
  assert data_lib.data_shards(_data_config(shards=8), 2, saved, 8) == 8  # explicit: a changed stream (below)
  assert data_lib.stream_changes(saved, data_lib.stream_definition(_data_config(shards=8), 8)) == [
      "data.shards: 4 -> 8"]
  assert data_lib.stream_changes(old, data_lib.stream_definition(_data_config(), 2)) == []


def test_data_shards_is_a_count_and_one_process_may_read_every_shard(specs):
  from llama_jax import config_lib
  with pytest.raises(ConfigError, match=r"^config.data.shards=-1: must be an integer >= 0$"):
    config_lib.check_ranges(tiny_test_config(**{"data.shards": -1}))
  old = tiny_test_config()
  del old.data["shards"]  # a checkpoint's config of before the key
  assert config_lib.with_added_keys(old).data.shards == 0
  # One process reading all 4 shards gives the global batches of 4 processes.
  config = _data_config(shards=S)
  batches = data_lib.process_batches(_corpus(specs["jsonl"]), TOK, config, data_lib.data_shards(config, 1))
  _assert_same(_take(batches, 3), _reference(specs["jsonl"], config, 3), "one process")
  batches.close()
