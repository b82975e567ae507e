"""A real GCS JSON-API server on 127.0.0.1 for the tests: `python -m tests.gcs_emulator PORT BUCKET`.

It is `gcp-storage-emulator`, in memory, with one fidelity fix: real GCS sends an
object's generation in the `x-goog-generation` header of every download, and
TensorStore (Orbax's array storage) reads it there before a conditional write of an
OCDBT manifest. The emulator omits the header, and every checkpoint of more than a
few arrays then fails with "Malformed StorageGeneration". The fix adds the two
headers real GCS sends; everything else is the emulator's own.
"""

import sys
import time

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  except Exception:  # pylint: disable=broad-except  # A missing object: the emulator answers 404.
    pass
  return _download(request, response, storage, *args, **kwargs)


objects.download = _download_with_generation  # Before the server module binds its routes.

from gcp_storage_emulator.server import create_server  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(port: int, bucket: str) -> None:
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.start()
  print(f"listening on 127.0.0.1:{port}", flush=True)
  while True:  # The test ends this process.
    time.sleep(3600)


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
