"""Python imports this module at start-up from the PYTHONPATH that tests/conftest.py gives subprocesses.

torch is installed for the tests that compare with transformers, and tensorboardX imports it wherever
it is installed (~2 s of each train.py). The project itself does not need it (requirements.txt has no
torch), so a subprocess runs as it would where it is not installed: the import system does not find
torch (importlib.util.find_spec("torch") is None, `import torch` raises ModuleNotFoundError) and
"torch" never enters sys.modules, which `datasets` reads as "torch was imported" (a None entry there
made its hashing of a task's config import torch and fail).
A subprocess that needs torch gets the environment of conftest.with_torch.
"""

import importlib.machinery
import sys


class _NoTorch(importlib.machinery.PathFinder):
  """The path finder, blind to the torch package."""

  @classmethod
  def find_spec(cls, fullname, path=None, target=None):
    if fullname == "torch" or fullname.startswith("torch."):
      return None
    return super().find_spec(fullname, path, target)


sys.meta_path[:] = [_NoTorch if finder is importlib.machinery.PathFinder else finder for finder in sys.meta_path]
