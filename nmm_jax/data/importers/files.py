"""Local files: a folder of images + captions JSONL, and interleaved-document JSONL."""
import os

from nmm_jax.data.importers import BadItem
from nmm_jax.data.importers.common import (
  aligned_segment_specs,
  clean_text,
  parse_json_object,
  read_image_file,
  resolve,
)


def _jsonl_lines(path: str) -> list:
  """[(where, line)] of the non-blank lines; parsed later, per item, so one bad line is one skip."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"JSONL file {path} does not exist")
  with open(path, encoding="utf-8") as f:
    return [(f"{path}:{n}", line) for n, line in enumerate(f, 1) if line.strip()]


class CaptionsImporter:
  """One JSONL line {"<image_key>": path, "<text_key>": caption, ...} -> [image, caption].

  Paths are relative to `images` (default: the JSONL's folder). Other keys go to the document's
  metadata."""

  def __init__(self, captions: str, images: str = "", image_key: str = "image",
               text_key: str = "caption", max_image_side: int = 0):
    self.captions, self.image_key, self.text_key = captions, image_key, text_key
    self.images = images or os.path.dirname(os.path.abspath(captions))
    self.max_image_side = max_image_side
    if not os.path.isdir(self.images):
      raise FileNotFoundError(f"image folder {self.images} does not exist")

  def items(self):
    return _jsonl_lines(self.captions)

  def convert(self, item):
    where, line = item
    row = parse_json_object(where, line)
    for key in (self.image_key, self.text_key):
      if key not in row:
        raise BadItem("unparsable", f"{where}: no key {key!r} (keys: {sorted(row)})")
    image = read_image_file(resolve(self.images, row[self.image_key]), where,
                            self.max_image_side)
    caption = clean_text(row[self.text_key], where)
    meta = {k: v for k, v in row.items() if k not in (self.image_key, self.text_key)}
    return (image, caption), meta


class InterleavedImporter:
  """One JSONL line = one document, in either form:

    OBELICS:   {"texts": ["a", null, "b"], "images": [null, "img.jpg", null], ...}
               (aligned lists; at each position exactly one of the two is set)
    segments:  {"segments": [{"text": "a"}, {"image": "img.jpg"}, {"text": "b"}], ...}

  Image paths are relative to `images` (default: the JSONL's folder). Empty text segments are
  dropped; other keys go to the metadata."""

  def __init__(self, documents: str, images: str = "", max_image_side: int = 0):
    self.documents = documents
    self.images = images or os.path.dirname(os.path.abspath(documents))
    self.max_image_side = max_image_side

  def items(self):
    return _jsonl_lines(self.documents)

  def _segment_specs(self, row, where):
    if "segments" in row:
      specs = row["segments"]
      if not isinstance(specs, list) or not all(isinstance(s, dict) for s in specs):
        raise BadItem("unparsable", f"{where}: 'segments' must be a list of objects")
      return [("image", s["image"]) if "image" in s else ("text", s.get("text")) for s in specs]
    if "texts" in row and "images" in row:
      return aligned_segment_specs(row["texts"], row["images"], where)
    raise BadItem("unparsable", f"{where}: expected 'segments' or 'texts' + 'images' "
                  f"(keys: {sorted(row)})")

  def convert(self, item):
    where, line = item
    row = parse_json_object(where, line)
    segments = []
    for kind, value in self._segment_specs(row, where):
      if kind == "image":
        if not isinstance(value, str):
          raise BadItem("unparsable", f"{where}: image reference {value!r} is not a path")
        segments.append(read_image_file(resolve(self.images, value), where,
                                        self.max_image_side))
      elif isinstance(value, str) and value.strip():
        segments.append(value.strip())
    if not any(isinstance(s, str) for s in segments):
      raise BadItem("empty", f"{where}: no text")
    meta = {k: v for k, v in row.items() if k not in ("segments", "texts", "images")}
    return tuple(segments), meta
