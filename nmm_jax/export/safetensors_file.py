"""Writes a .safetensors file one tensor at a time.

The `safetensors` library's writers take every tensor at once and copy each into a bytes object,
so a model would be in host memory twice. This writer emits the same format
(github.com/huggingface/safetensors: u64 header length, JSON header with dtype, shape and byte
offsets, padded to 8 bytes, then the raw little-endian data): the header first, from the specs,
then each tensor as it is made, so only one converted tensor exists at a time. Files are read
back with the library (`safetensors.safe_open`) in the tests.
"""
import dataclasses
import json
import os
import struct
from typing import Callable, Sequence

import ml_dtypes
import numpy as np
import tqdm

_DTYPES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16",
           np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype("int32"): "I32",
           np.dtype("int64"): "I64", np.dtype("bool"): "BOOL"}


@dataclasses.dataclass
class Tensor:
  name: str
  shape: tuple
  dtype: np.dtype
  make: Callable[[], np.ndarray]  # called once, when the tensor is written


def write(path: str, tensors: Sequence[Tensor], metadata: dict | None = None,
          progress: bool = False):
  """Writes `tensors` to `path` (via a temporary file renamed at the end); `progress`: a bar
  of the bytes written."""
  header, offset = {}, 0
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  for t in tensors:
    dtype = np.dtype(t.dtype)
    size = int(np.prod(t.shape, dtype=np.int64)) * dtype.itemsize
    header[t.name] = {"dtype": _DTYPES[dtype], "shape": list(t.shape),
                      "data_offsets": [offset, offset + size]}
    offset += size
  header_bytes = json.dumps(header, separators=(",", ":")).encode()
  header_bytes += b" " * (-len(header_bytes) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(header_bytes)))
    f.write(header_bytes)
    bar = tqdm.tqdm(total=offset, unit="B", unit_scale=True, desc=os.path.basename(path),
                    disable=not progress)
    for t in tensors:
      array = np.ascontiguousarray(t.make(), dtype=t.dtype)
      if array.shape != tuple(t.shape):
        raise ValueError(f"tensor {t.name}: made shape {array.shape}, declared {tuple(t.shape)}")
      f.write(array.reshape(-1).view(np.uint8).data)  # little-endian hosts: the file's order
      bar.update(array.nbytes)
    bar.close()
  os.replace(tmp, path)

