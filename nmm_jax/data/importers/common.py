"""Helpers shared by the importers: image bytes -> `ImageSegment`, JSON objects, text checks."""
import io
import json
import os

from PIL import Image, UnidentifiedImageError

from nmm_jax.data.importers import BadItem
from nmm_jax.data.records import ImageSegment

# The record schema stores JPEG or PNG; anything else PIL reads is re-encoded as PNG.
STORED_FORMATS = ("JPEG", "PNG")


def image_segment(encoded: bytes, where: str, max_side: int = 0) -> ImageSegment:
  """Checked image bytes. Kept as they are when JPEG/PNG and within `max_side` (0: no limit);
  otherwise re-encoded (JPEG stays JPEG, quality 95). Raises BadItem("bad_image")."""
  try:
    with Image.open(io.BytesIO(encoded)) as img:
      img.load()  # decodes fully: truncated files fail here, not in the training pipeline
      fmt, width, height = img.format, img.width, img.height
      too_big = max_side and max(width, height) > max_side
      if fmt in STORED_FORMATS and not too_big:
        return ImageSegment(encoded, height, width)
      out = img.convert("RGB")
      if too_big:
        scale = max_side / max(width, height)
        out = out.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                         Image.Resampling.BICUBIC)
  except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
    raise BadItem("bad_image", f"{where}: {type(e).__name__}: {e}") from e
  buffer = io.BytesIO()
  if fmt == "JPEG":
    out.save(buffer, format="JPEG", quality=95)
  else:
    out.save(buffer, format="PNG")
  return ImageSegment(buffer.getvalue(), out.height, out.width)


def read_image_file(path: str, where: str, max_side: int = 0) -> ImageSegment:
  if path.startswith(("http://", "https://")):
    raise BadItem("missing_image", f"{where}: {path} is a URL; nmm-data write does not fetch: "
                  "download the images first (e.g. with img2dataset) and reference the local "
                  "files")
  try:
    with open(path, "rb") as f:
      encoded = f.read()
  except OSError as e:
    raise BadItem("missing_image", f"{where}: {e}") from e
  return image_segment(encoded, f"{where} ({path})", max_side)


def resolve(root: str, path: str) -> str:
  return path if os.path.isabs(path) else os.path.join(root, path)


def clean_text(text, where: str) -> str:
  if not isinstance(text, str):
    raise BadItem("unparsable", f"{where}: text is {type(text).__name__}, not a string")
  text = text.strip()
  if not text:
    raise BadItem("empty", f"{where}: empty text")
  return text


def parse_json_object(where: str, text: str) -> dict:
  """The JSON object in `text`; anything else (bad JSON, a list, a number) is BadItem."""
  try:
    row = json.loads(text)
  except json.JSONDecodeError as e:
    raise BadItem("unparsable", f"{where}: {e}") from e
  if not isinstance(row, dict):
    raise BadItem("unparsable", f"{where}: expected a JSON object, got {type(row).__name__}")
  return row


def aligned_segment_specs(texts, images, where: str) -> list:
  """OBELICS's aligned lists -> [("text", t) | ("image", ref)]: at each position exactly one of
  the two is set (None for the other)."""
  if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
    raise BadItem("unparsable", f"{where}: the texts and images lists must be lists of one "
                  f"length (got {_length(texts)} and {_length(images)})")
  specs = []
  for i, (text, image) in enumerate(zip(texts, images)):
    if (text is None) == (image is None):
      raise BadItem("unparsable", f"{where}: position {i} must set exactly one of text/image")
    specs.append(("image", image) if image is not None else ("text", text))
  return specs


def _length(value) -> str:
  return str(len(value)) if isinstance(value, list) else type(value).__name__
