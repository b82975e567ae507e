"""A real GCS JSON-API server on 127.0.0.1 for the tests: `python -m tests.gcs_emulator PORT BUCKET`.

It is `gcp-storage-emulator`, in memory, with two fidelity fixes, each written from what
Cloud Storage documents, not from what our code expects:

- Real GCS sends an object's generation in the `x-goog-generation` header of every
  download, and TensorStore (Orbax's array storage) reads it there before a conditional
  write of an OCDBT manifest. The emulator omits the header, and every checkpoint of more
  than a few arrays then fails with "Malformed StorageGeneration". The fix adds the two
  headers real GCS sends.
- Request preconditions ("Request preconditions", cloud.google.com/storage/docs/
  request-preconditions): an upload or a delete with `ifGenerationMatch=N` proceeds only if
  the object's live generation is N, and N = 0 means the object must not exist; otherwise
  the request fails with HTTP 412 Precondition Failed and changes nothing. A resumable
  upload takes its preconditions when it starts and checks them when it completes. The
  emulator ignores them; generations already grow with every write (they are time_ns).

Everything else is the emulator's own.
"""

import sys
import threading
import time
from http import HTTPStatus

from gcp_storage_emulator import storage as storage_lib
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download
_PRECONDITION = "_ifGenerationMatch"  # Where a resumable upload keeps its precondition until it completes.
_request = threading.local()  # The current request's ifGenerationMatch (one thread per request).


class PreconditionFailed(Exception):
  pass


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  except Exception:  # pylint: disable=broad-except  # A missing object: the emulator answers 404.
    pass
  return _download(request, response, storage, *args, **kwargs)


def _check(storage, bucket: str, name: str, wanted) -> None:
  if wanted is None:
    return
  try:
    live = str(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    live = "0"  # No live object: only ifGenerationMatch=0 holds.
  if str(wanted) != live:
    raise PreconditionFailed()


def _with_preconditions(handler):
  def wrapped(request, response, storage, *args, **kwargs):
    _request.if_generation_match = (request.query.get("ifGenerationMatch") or [None])[0]
    try:
      if handler is _delete and _request.if_generation_match is not None:
        _check(storage, request.params["bucket_name"], request.params["object_id"], _request.if_generation_match)
      return handler(request, response, storage, *args, **kwargs)
    except PreconditionFailed:
      message = "At least one of the pre-conditions you specified did not hold."
      response.status = HTTPStatus.PRECONDITION_FAILED
      response.json(
        {
          "error": {
            "code": 412,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": "conditionNotMet"}],
          }
        }
      )
    finally:
      _request.if_generation_match = None

  return wrapped


_create_file = storage_lib.Storage.create_file
_create_resumable_upload = storage_lib.Storage.create_resumable_upload


def _create_file_if(self, bucket_name, file_name, content, file_obj, file_id=None):
  wanted = file_obj.pop(_PRECONDITION, None) if file_id else getattr(_request, "if_generation_match", None)
  _check(self, bucket_name, file_name, wanted)
  return _create_file(self, bucket_name, file_name, content, file_obj, file_id)


def _create_resumable_upload_if(self, bucket_name, file_name, file_obj):
  wanted = getattr(_request, "if_generation_match", None)
  if wanted is not None:
    file_obj = {**file_obj, _PRECONDITION: wanted}
  return _create_resumable_upload(self, bucket_name, file_name, file_obj)


_delete = objects.delete
objects.download = _download_with_generation  # Before the server module binds its routes.
objects.insert = _with_preconditions(objects.insert)
objects.upload_partial = _with_preconditions(objects.upload_partial)
objects.delete = _with_preconditions(_delete)
storage_lib.Storage.create_file = _create_file_if
storage_lib.Storage.create_resumable_upload = _create_resumable_upload_if

from gcp_storage_emulator.server import create_server  # noqa: E402  (after the patches above)


def main(port: int, bucket: str) -> None:
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.start()
  print(f"listening on 127.0.0.1:{port}", flush=True)
  while True:  # The test ends this process.
    time.sleep(3600)


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
