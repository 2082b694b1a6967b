"""Table rows -> documents, for the importers that read columns (Parquet, Hugging Face datasets).

A row is a dict of column values. Caption pairs take an image column and a text column;
OBELICS-style interleaved rows take a texts column and an images column (aligned lists, one of
the two set at each position). An image value may be:
  {"bytes": ..., "path": ...}  Hugging Face's Image feature (bytes win; else the path is read)
  bytes                        the encoded image
  "relative/or/absolute/path"  a file under the image root
  "http(s)://..."              a counted missing_image: nothing is fetched at conversion time
"""
import os

from nmm_jax.data.importers import BadItem
from nmm_jax.data.importers.common import (
  aligned_segment_specs,
  clean_text,
  image_segment,
  read_image_file,
  resolve,
)


class RowConverter:
  """The columns a table importer reads, and one row -> (segments, metadata)."""

  def __init__(self, *, image_column: str = "", text_column: str = "", texts_column: str = "",
               images_column: str = "", images: str = "", max_image_side: int = 0):
    self.interleaved = bool(texts_column or images_column)
    if self.interleaved and not (texts_column and images_column):
      raise ValueError("interleaved rows need both --texts_column and --images_column")
    self.image_column, self.text_column = image_column or "image", text_column or "caption"
    self.texts_column, self.images_column = texts_column, images_column
    self.images, self.max_image_side = images, max_image_side

  @property
  def columns(self) -> list:
    if self.interleaved:
      return [self.texts_column, self.images_column]
    return [self.image_column, self.text_column]

  def check_columns(self, available, where: str):
    """A clear error naming the input and its columns when a needed one is missing."""
    missing = [c for c in self.columns if c not in available]
    if missing:
      flags = ("--texts_column/--images_column" if self.interleaved
               else "--image_column/--text_column")
      raise ValueError(f"{where}: no column {', '.join(map(repr, missing))} (columns: "
                       f"{', '.join(available)}); choose them with {flags}")

  def convert(self, row: dict, where: str, root: str):
    """(segments, metadata) of one row; image paths are relative to `images` or else `root`."""
    root = self.images or root
    if not self.interleaved:
      image = self._image(row[self.image_column], where, root)
      text = row[self.text_column]
      if text is None:
        raise BadItem("empty", f"{where}: no text (null {self.text_column!r})")
      return (image, clean_text(text, where)), {}
    segments = []
    for kind, value in aligned_segment_specs(row[self.texts_column], row[self.images_column],
                                             where):
      if kind == "image":
        segments.append(self._image(value, where, root))
      elif isinstance(value, str) and value.strip():
        segments.append(value.strip())
    if not any(isinstance(s, str) for s in segments):
      raise BadItem("empty", f"{where}: no text")
    return tuple(segments), {}

  def _image(self, value, where: str, root: str):
    if isinstance(value, dict):  # {"bytes", "path"}: Hugging Face's Image storage
      if value.get("bytes"):
        return image_segment(value["bytes"], where, self.max_image_side)
      value = value.get("path")
    if isinstance(value, (bytes, bytearray)) and value:
      return image_segment(bytes(value), where, self.max_image_side)
    if isinstance(value, str) and value:
      path = value if value.startswith(("http://", "https://")) else resolve(root, value)
      return read_image_file(path, where, self.max_image_side)
    raise BadItem("missing_image", f"{where}: no image ({type(value).__name__} {value!r:.40})")


def folder_of(path: str) -> str:
  return os.path.dirname(os.path.abspath(path))
