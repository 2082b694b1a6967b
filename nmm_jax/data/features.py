"""One document -> one or more unpacked pieces of per-token features (the batch contract, unpacked).

A document is  <bos> text... [<image_start> <image>*P <image_end>]... <eos>; inputs are the ids
without the last, targets without the first. A document longer than the sequence (or with more
images than a row holds) is split into consecutive pieces at text positions, never inside an
image; every target is predicted exactly once. A document that cannot be used raises
`SkipDocument` with a short reason, which the pipeline counts (`data/skipped/<reason>`).
"""
import numpy as np

from nmm_jax.data import batch as batch_lib
from nmm_jax.data.records import ImageSegment


class SkipDocument(Exception):
  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason, self.detail = reason, detail


def _document_ids(doc, tokenizer, patches_per_image: int, image_view):
  """(ids, image_spans, images): the whole document, with image spans as (start, end) ids."""
  ids, spans, images, text_tokens = [tokenizer.bos_id], [], [], 0
  for segment in doc.segments:
    if isinstance(segment, ImageSegment):
      try:
        pixels = image_view(segment.encoded)
      except Exception as e:  # PIL raises many types for broken bytes
        raise SkipDocument("bad_image", f"{type(e).__name__}: {e}") from e
      spans.append((len(ids), len(ids) + patches_per_image + 1))
      ids += [tokenizer.image_start_id] + [tokenizer.image_id] * patches_per_image
      ids.append(tokenizer.image_end_id)
      images.append(pixels)
    else:
      words = tokenizer.encode(segment)
      text_tokens += len(words)
      ids += words
  if text_tokens == 0:
    raise SkipDocument("empty", "no text tokens")
  ids.append(tokenizer.eos_id)
  return np.asarray(ids, np.int32), spans, images


def text_target_mask(targets, tokenizer) -> np.ndarray:
  """float32 1 where a target is text (the loss scores it), 0 for padding and image markers."""
  return (~np.isin(targets, tokenizer.non_text_ids)).astype(np.float32)


def _cut_points(num_inputs: int, spans, seq_len: int, max_images: int):
  """Piece boundaries [0, c1, ..., num_inputs]: each piece has <= seq_len inputs and
  <= max_images images, and no boundary falls inside an image span."""
  cuts, start = [0], 0
  while start < num_inputs:
    end = min(start + seq_len, num_inputs)
    inside = [s for s, e in spans if s < end <= e]
    if inside:
      end = inside[0]
    starts_in_piece = [s for s, _ in spans if start <= s < end]
    if len(starts_in_piece) > max_images:
      end = starts_in_piece[max_images]
    if end <= start:
      raise SkipDocument("too_long", f"an image span of {spans[0][1] - spans[0][0] + 1} tokens "
                         f"does not fit a row of {seq_len}")
    cuts.append(end)
    start = end
  return cuts


def document_pieces(doc, tokenizer, source_id: int, *, patches_per_image: int, image_size: int,
                    seq_len: int, max_images: int, image_view) -> list[dict]:
  """Unpacked pieces of `doc` ({batch.PIECE_KEYS: [n], "images": [i, S, S, 3]});
  `image_view(encoded) -> [S, S, 3] uint8` decodes/augments."""
  ids, spans, images = _document_ids(doc, tokenizer, patches_per_image, image_view)
  image_ids = batch_lib.padding("image_ids", len(ids))
  patch_ids = batch_lib.padding("patch_ids", len(ids))
  for i, (s, e) in enumerate(spans):
    image_ids[s + 1:e] = i
    patch_ids[s + 1:e] = np.arange(patches_per_image)
  targets_all = ids[1:]
  loss_mask_all = text_target_mask(targets_all, tokenizer)
  cuts = _cut_points(len(targets_all), spans, seq_len, max_images)
  pieces = []
  for a, b in zip(cuts[:-1], cuts[1:]):
    in_piece = [i for i, (s, _) in enumerate(spans) if a <= s < b]
    piece_images = [images[i] for i in in_piece]
    # Image ids restart at 0 in each piece (the packer offsets them per row).
    local_image_ids = np.where(image_ids[a:b] >= 0, image_ids[a:b] - (in_piece or [0])[0],
                               batch_lib.NO_IMAGE)
    pieces.append({
        "tokens": ids[a:b],
        "targets": targets_all[a:b],
        "loss_mask": loss_mask_all[a:b],
        "image_ids": local_image_ids.astype(np.int32),
        "patch_ids": patch_ids[a:b],
        "source": np.full(b - a, source_id, np.int32),
        "images": (np.stack(piece_images) if piece_images
                   else batch_lib.padding("images", (0, image_size, image_size, 3))),
    })
  return pieces
