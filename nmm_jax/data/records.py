"""The shard record schema: one record = one msgpack-encoded document.

Schema version 1:
  {"v": 1, "source": str,
   "segments": [{"text": str} | {"image": PNG/JPEG bytes, "h": int, "w": int}],
   "meta": {str: any}}
A document is an ordered list of segments; an image-caption pair is [image, text], a text-only
document has no image segment.
"""
import dataclasses
import io
from typing import Any

import msgpack
import numpy as np
from PIL import Image

from nmm_jax.data import images

SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ImageSegment:
  encoded: bytes  # PNG or JPEG
  height: int
  width: int

  def decode(self) -> np.ndarray:
    """[H, W, 3] uint8."""
    return np.asarray(images.decode(self.encoded), dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class Document:
  source: str
  segments: tuple  # of str | ImageSegment
  meta: dict = dataclasses.field(default_factory=dict)

  @property
  def num_images(self) -> int:
    return sum(isinstance(s, ImageSegment) for s in self.segments)


def encode_png(pixels_HxWx3: np.ndarray) -> ImageSegment:
  buffer = io.BytesIO()
  Image.fromarray(pixels_HxWx3).save(buffer, format="PNG")
  return ImageSegment(buffer.getvalue(), *pixels_HxWx3.shape[:2])


def encode_document(doc: Document) -> bytes:
  segments = [{"text": s} if isinstance(s, str)
              else {"image": s.encoded, "h": s.height, "w": s.width} for s in doc.segments]
  return msgpack.packb({"v": SCHEMA_VERSION, "source": doc.source, "segments": segments,
                        "meta": doc.meta}, use_bin_type=True)


def decode_document(raw: bytes) -> Document:
  record: dict[str, Any] = msgpack.unpackb(raw, raw=False)
  if record.get("v") != SCHEMA_VERSION:
    raise ValueError(f"record schema version {record.get('v')!r}, expected {SCHEMA_VERSION}")
  segments = tuple(s["text"] if "text" in s else ImageSegment(s["image"], s["h"], s["w"])
                   for s in record["segments"])
  return Document(record["source"], segments, record.get("meta", {}))
