"""Images and text -> model inputs in the batch contract, laid out as training lays out documents.

A sequence is  <bos> [<image_start> <image>*P <image_end>]... text  (images first, as in the
caption source), with positions from 0 and one segment (document) per row. Prompts for decoding
are left-padded, so every row's next token lands at the same cache position; scored sequences
are right-padded, like packed training rows.
"""
import dataclasses

import numpy as np

from nmm_jax.data import batch as batch_lib
from nmm_jax.data import images as images_lib
from nmm_jax.data.batch import NO_IMAGE
from nmm_jax.data.features import text_target_mask


@dataclasses.dataclass
class Sequence:
  """One row's token features (unpadded) and its images [I, S, S, 3] uint8."""
  tokens: np.ndarray
  image_ids: np.ndarray
  patch_ids: np.ndarray
  images: np.ndarray


def load_image(path: str, size: int) -> np.ndarray:
  """[size, size, 3] uint8: the eval view (shorter side resized, centre crop) of an image file."""
  with open(path, "rb") as f:
    encoded = f.read()
  try:
    return images_lib.eval_view(images_lib.decode(encoded), size)
  except Exception as e:  # PIL raises many types for unreadable bytes
    raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def build_sequence(tokenizer, images_IxSxSx3, text_ids, patches_per_image: int) -> Sequence:
  """<bos>, each image's span, then `text_ids`."""
  ids, image_ids, patch_ids = [tokenizer.bos_id], [NO_IMAGE], [NO_IMAGE]
  for i in range(len(images_IxSxSx3)):
    ids += [tokenizer.image_start_id] + [tokenizer.image_id] * patches_per_image
    ids.append(tokenizer.image_end_id)
    image_ids += [NO_IMAGE] + [i] * patches_per_image + [NO_IMAGE]
    patch_ids += [NO_IMAGE] + list(range(patches_per_image)) + [NO_IMAGE]
  ids += list(text_ids)
  image_ids += [NO_IMAGE] * len(text_ids)
  patch_ids += [NO_IMAGE] * len(text_ids)
  as_int = lambda values: np.asarray(values, np.int32)
  return Sequence(as_int(ids), as_int(image_ids), as_int(patch_ids),
                  np.asarray(images_IxSxSx3, np.uint8))


def _batch(rows: list[dict], sequences: list[Sequence], length: int, pad_left: bool,
           tokenizer, image_size: int) -> dict:
  """The rows padded to `length` (tokens with <pad>), plus the rows' images when any has one."""
  batch = batch_lib.stack_rows(rows, length, pad_left, pads={"tokens": tokenizer.pad_id})
  images = _images(sequences, image_size)
  if images is not None:
    batch["images"] = images
  return batch


def _images(sequences: list[Sequence], image_size: int):
  """[B, I, S, S, 3] with I = the most images in a row, or None when no row has one."""
  most = max(len(s.images) for s in sequences)
  if not most:
    return None
  out = batch_lib.padding("images", (len(sequences), most, image_size, image_size, 3))
  for r, s in enumerate(sequences):
    out[r, :len(s.images)] = s.images
  return out


def _features(s: Sequence) -> dict:
  n = len(s.tokens)
  return {"tokens": s.tokens, "segment_ids": np.ones(n, np.int32),
          "positions": np.arange(n, dtype=np.int32), "image_ids": s.image_ids,
          "patch_ids": s.patch_ids}


def prompt_batch(sequences: list[Sequence], tokenizer, image_size: int, length: int = 0) -> dict:
  """Left-padded prompts for `NMM.prefill`, [B, length] (default: the longest prompt)."""
  length = length or max(len(s.tokens) for s in sequences)
  return _batch([_features(s) for s in sequences], sequences, length, True, tokenizer, image_size)


def scored_batch(sequences: list[Sequence], tokenizer, image_size: int, length: int) -> dict:
  """Right-padded rows with next-token targets; `loss_mask` marks the text targets (the ones
  training scores). Each row is scored on tokens[1:]."""
  rows = []
  for s in sequences:
    features = _features(s)
    features = {k: v[:-1] for k, v in features.items()}
    targets = s.tokens[1:]
    features["targets"] = targets
    features["loss_mask"] = text_target_mask(targets, tokenizer)
    rows.append(features)
  return _batch(rows, sequences, length, False, tokenizer, image_size)
