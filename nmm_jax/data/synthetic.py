"""The embedded default dataset: procedurally drawn shapes whose text is learnable from the image.

Every image holds 1-3 shapes of one colour and one kind, grouped in one region; its caption states
colour, kind, count and region ("two red circles on the left ."). Three sources, as in the paper's
mixture: `caption` (image then caption), `interleaved` (several captioned pictures and a sentence
that needs all of them), `text` (text-only sentences about counts of shapes).
"""
import numpy as np
from PIL import Image, ImageDraw

from nmm_jax.data.records import Document, encode_png

COLOURS = {"red": (220, 50, 50), "green": (50, 190, 70), "blue": (60, 90, 230),
           "yellow": (235, 215, 50), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
REGIONS = ("left", "right", "top", "bottom")
REGION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
                 "bottom": "at the bottom"}
MAX_COUNT = 3
SOURCES = ("caption", "interleaved", "text")

VOCABULARY = sorted(set(
    list(COLOURS) + list(SHAPES) + list(PLURAL.values()) + list(NUMBERS)
    + " ".join(REGION_PHRASE.values()).split()
    + "picture : there are shapes in all and more make . ,".split()))


def _region_box(region: str, size: int):
  half = size // 2
  return {"left": (0, 0, half, size), "right": (half, 0, size, size),
          "top": (0, 0, size, half), "bottom": (0, half, size, size)}[region]


def draw_shapes(rng: np.random.Generator, size: int, colour: str, shape: str, count: int,
                region: str) -> np.ndarray:
  """[size, size, 3] uint8: `count` shapes in non-overlapping cells of `region`."""
  img = Image.new("RGB", (size, size), (0, 0, 0))
  draw = ImageDraw.Draw(img)
  x0, y0, x1, y1 = _region_box(region, size)
  # Cells along the long side of the region, one shape per cell, so shapes never overlap.
  horizontal = (x1 - x0) >= (y1 - y0)
  cells = rng.permutation(MAX_COUNT)[:count]
  cell_len = ((x1 - x0) if horizontal else (y1 - y0)) / MAX_COUNT
  short = (y1 - y0) if horizontal else (x1 - x0)
  extent = max(3, int(min(cell_len, short) * 0.8))
  for cell in cells:
    along = int(cell * cell_len + rng.integers(0, max(1, int(cell_len) - extent + 1)))
    across = int(rng.integers(0, max(1, short - extent + 1)))
    cx, cy = (x0 + along, y0 + across) if horizontal else (x0 + across, y0 + along)
    box = (cx, cy, cx + extent - 1, cy + extent - 1)
    fill = COLOURS[colour]
    if shape == "circle":
      draw.ellipse(box, fill=fill)
    elif shape == "square":
      draw.rectangle(box, fill=fill)
    else:
      draw.polygon([(cx + (extent - 1) / 2, cy), (cx, cy + extent - 1),
                    (cx + extent - 1, cy + extent - 1)], fill=fill)
  return np.asarray(img, dtype=np.uint8)


def _noun(count: int, shape: str) -> str:
  return shape if count == 1 else PLURAL[shape]


def random_picture(rng: np.random.Generator, size: int):
  colour = str(rng.choice(list(COLOURS)))
  shape = str(rng.choice(SHAPES))
  count = int(rng.integers(1, MAX_COUNT + 1))
  region = str(rng.choice(REGIONS))
  pixels = draw_shapes(rng, size, colour, shape, count, region)
  caption = f"{NUMBERS[count]} {colour} {_noun(count, shape)} {REGION_PHRASE[region]} ."
  attributes = {"colour": colour, "shape": shape, "count": count, "region": region}
  return encode_png(pixels), caption, attributes


def caption_document(rng, size) -> Document:
  image, caption, attributes = random_picture(rng, size)
  return Document("caption", (image, caption), {"attributes": [attributes]})


def interleaved_document(rng, size) -> Document:
  segments, attributes = [], []
  for i in range(int(rng.integers(2, 4))):
    image, caption, attrs = random_picture(rng, size)
    segments += [f"picture {NUMBERS[i + 1]} :", image, caption]
    attributes.append(attrs)
  total = sum(a["count"] for a in attributes)
  segments.append(f"there are {NUMBERS[total]} shapes in all .")
  return Document("interleaved", tuple(segments), {"attributes": attributes})


def text_document(rng, size) -> Document:
  del size
  sentences = []
  for _ in range(int(rng.integers(2, 5))):
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    a = int(rng.integers(1, 5))
    b = int(rng.integers(1, 10 - a))
    sentences.append(f"{NUMBERS[a]} {colour} {_noun(a, shape)} and {NUMBERS[b]} more make "
                     f"{NUMBERS[a + b]} {colour} {PLURAL[shape]} .")
  return Document("text", (" ".join(sentences),))


MAKERS = {"caption": caption_document, "interleaved": interleaved_document,
          "text": text_document}


def generate_documents(source: str, count: int, image_size: int, seed: int):
  """Deterministic: the same arguments give the same documents on any machine."""
  rng = np.random.default_rng([seed, SOURCES.index(source)])
  return [MAKERS[source](rng, image_size) for _ in range(count)]
