"""Python imports this module at start-up from the PYTHONPATH that tests/conftest.py gives subprocesses.

torch is installed for the tests that compare with transformers, and tensorboardX imports it wherever
it is installed (~2 s of each train.py). The project itself does not need it (requirements.txt has no
torch), so a subprocess runs as it would where it is not installed: `import torch` raises ImportError.
A subprocess that needs torch gets the environment of conftest.with_torch.
"""

import sys

sys.modules["torch"] = None
