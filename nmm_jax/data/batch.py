"""The batch contract (data -> model): each key of a batch, its axes, dtype and pad value.

The one table the pipeline, the train program (shardings before the first batch), evaluation
rows and the benchmarks read; WORKSPACE.md says what each key means. Axes: B rows, L positions,
I image slots per row, H x W pixels, C channels.
"""
import dataclasses

import numpy as np

# image_ids / patch_ids of a position that is not an image patch (text, markers, padding).
NO_IMAGE = -1


@dataclasses.dataclass(frozen=True)
class Field:
  axes: str        # one letter per dimension (module docstring)
  dtype: type
  pad: int         # value of a padding position (segment 0, no loss, no image, no source)

  @property
  def ndim(self) -> int:
    return len(self.axes)


FIELDS = {
    "tokens": Field("BL", np.int32, 0),
    "targets": Field("BL", np.int32, 0),
    "loss_mask": Field("BL", np.float32, 0),
    "image_ids": Field("BL", np.int32, NO_IMAGE),
    "patch_ids": Field("BL", np.int32, NO_IMAGE),
    "source": Field("BL", np.int32, -1),
    "segment_ids": Field("BL", np.int32, 0),
    "positions": Field("BL", np.int32, 0),
    "images": Field("BIHWC", np.uint8, 0),
}
# Keys with one value per position: a text-only batch has exactly these.
TOKEN_KEYS = tuple(k for k, f in FIELDS.items() if f.axes == "BL")
# Made by packing (the packed document's id, the position inside it), not carried by a piece.
PACKING_KEYS = ("segment_ids", "positions")
# The per-position keys of one unpacked document piece (features.py).
PIECE_KEYS = tuple(k for k in TOKEN_KEYS if k not in PACKING_KEYS)


def ndims(keys=FIELDS) -> dict:
  """{key: rank} (what the batch shardings are built from)."""
  return {k: FIELDS[k].ndim for k in keys}


def shapes(rows: int, length: int, images: int = 0, height: int = 0, width: int = 0,
           channels: int = 3, keys=FIELDS) -> dict:
  """{key: (shape, dtype)} of a batch of `rows` rows of `length` positions, `images` slots."""
  sizes = {"B": rows, "L": length, "I": images, "H": height, "W": width, "C": channels}
  return {k: (tuple(sizes[a] for a in FIELDS[k].axes), FIELDS[k].dtype) for k in keys}


def padding(key: str, shape) -> np.ndarray:
  """An array of `key`'s dtype holding only its pad value."""
  return np.full(shape, FIELDS[key].pad, FIELDS[key].dtype)


def empty(key_shapes: dict) -> dict:
  """An all-padding batch of these {key: (shape, dtype)} (what `shapes` gives)."""
  return {k: np.full(shape, FIELDS[k].pad, dtype) for k, (shape, dtype) in key_shapes.items()}


def empty_like(batch: dict) -> dict:
  """An all-padding batch shaped like `batch` (for an eval stream that has ended); the
  non-array `skipped` counts are left out."""
  return {k: np.full_like(v, FIELDS[k].pad) for k, v in batch.items() if k != "skipped"}


def pad_rows(batch: dict, rows: int) -> dict:
  """`batch` with empty rows (segment 0, no loss) appended up to `rows`: sums are unchanged and
  the batch still divides over the data axes."""
  missing = rows - len(batch["tokens"])
  if missing <= 0:
    return batch
  return {k: np.concatenate([v, np.full((missing,) + v.shape[1:], FIELDS[k].pad, v.dtype)])
          for k, v in batch.items()}


def stack_rows(rows: list[dict], length: int, pad_left: bool = False, pads=None) -> dict:
  """Rows of per-position features (1-d arrays, a row's keys all one length) -> [len(rows),
  length] arrays padded with each key's pad value (`pads`: {key: value} overrides, e.g. tokens
  with the tokenizer's <pad>); `pad_left` puts the padding first."""
  pads = pads or {}
  batch = {}
  for key in rows[0]:
    out = np.full((len(rows), length), pads.get(key, FIELDS[key].pad), rows[0][key].dtype)
    for r, row in enumerate(rows):
      n = len(row[key])
      if n > length:
        raise ValueError(f"a sequence of {n} tokens does not fit {length}")
      if pad_left:
        out[r, length - n:] = row[key]
      else:
        out[r, :n] = row[key]
    batch[key] = out
  return batch
