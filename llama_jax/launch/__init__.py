"""Running a llama_jax command on a Cloud TPU slice, and again after every preemption:
`python -m llama_jax.launch --tpu NAME --zone ZONE --accelerator_type v5p-64 -- python train.py ...`.

- accelerators.py: accelerator types (`v5p-64`) -> chips, hosts (workers), default runtime version;
- command.py: the user's command (a llama_jax entry point), its workdir, the line each worker runs;
- gcloud.py: the gcloud commands (argv forms as MaxText's and Levanter's launchers use them), the Runner that
  runs them (tests inject their own), the slice's state from `describe`;
- provision.py: the slice brought to READY (created, deleted and created again after a preemption, waited for);
- ship.py: this checkout packed, copied to every worker, unpacked; the requirements installed once per VM;
- supervisor.py: `launch(options, command_argv, runner=None, out=None)`: one attempt after another until the
  command exits 0 on every worker, bad input shows, or --max_restarts relaunches are spent;
- __main__.py: the command line (absl flags) around `launch`.
"""
