"""Image decoding and augmentation: encoded bytes -> [S, S, 3] uint8 at the model's resolution.

Train: random-resized crop (area scale from config, aspect ratio 3/4..4/3) and a horizontal flip.
Eval: resize the shorter side to S, centre crop. Normalisation and patchifying happen on the
device (`models/fusion.py: patchify`): batches carry uint8, a quarter of the f32 bytes.
"""
import io
import math

import numpy as np
from PIL import Image

_RATIO = (3 / 4, 4 / 3)


def decode(encoded: bytes) -> Image.Image:
  """Decoded RGB image; raises on bytes that are not a readable image."""
  with Image.open(io.BytesIO(encoded)) as img:
    return img.convert("RGB")


def _random_box(width: int, height: int, rng: np.random.Generator, scale):
  """(left, top, right, bottom) of a random crop with area fraction in `scale` (Inception-style);
  falls back to the centre square after 10 tries."""
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(*scale)
    ratio = math.exp(rng.uniform(math.log(_RATIO[0]), math.log(_RATIO[1])))
    w = int(round(math.sqrt(target * ratio)))
    h = int(round(math.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  return _centre_box(width, height)


def _centre_box(width: int, height: int):
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  return left, top, left + side, top + side


def train_view(img: Image.Image, size: int, rng: np.random.Generator, *, crop_scale,
               flip_prob: float) -> np.ndarray:
  box = _random_box(img.width, img.height, rng, crop_scale)
  out = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
  if rng.uniform() < flip_prob:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(out, np.uint8)


def eval_view(img: Image.Image, size: int) -> np.ndarray:
  box = _centre_box(img.width, img.height)
  if box == (0, 0, size, size):  # already square at the target size
    return np.asarray(img, np.uint8)
  return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=box), np.uint8)
