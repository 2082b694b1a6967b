"""Starts gcp-storage-emulator (PyPI), the GCS server the bucket tests run against:
  python tests/gcs_emulator.py PORT BUCKET

One gap of the emulator is filled first: real GCS answers every object download with the object's
generation in an `x-goog-generation` header
(https://cloud.google.com/storage/docs/xml-api/reference-headers#xgooggeneration); the emulator
leaves it out. TensorStore reads it to make its conditional writes (OCDBT's manifest, which every
Orbax checkpoint updates), and without it the second write of a manifest fails ("Malformed
StorageGeneration"). Nothing else is changed. The emulator also accepts, unchecked, the
preconditions (ifGenerationMatch) TensorStore and gcsfs send: concurrent writers are not tested.
"""
import sys
import time

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # not found: the emulator has answered 404 already
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj["metageneration"])


def _route_downloads_through_the_fix():
  objects.download = _download_with_generation  # objects.get calls it for ?alt=media
  for _, methods in server.HANDLERS:  # (pattern, {method: handler})
    for method, handler in list(methods.items()):
      if handler is _download:
        methods[method] = _download_with_generation


if __name__ == "__main__":
  port, bucket = int(sys.argv[1]), sys.argv[2]
  _route_downloads_through_the_fix()
  server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).start()
  while True:
    time.sleep(3600)
