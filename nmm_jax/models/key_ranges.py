"""The packed multimodal attention mask as one key range per query.

attention.attention_mask is causal inside a document and bidirectional among one image's
patches. Every image is a contiguous span inside one document, so the keys a query may see are
contiguous: `start(q) <= k < limit(q)`, with start(q) the first position of q's document and
limit(q) = q + 1 for text, one past the image's last position for an image patch. Padding
(segment id 0) gets the empty range start = limit = 0. Two [B, L] arrays instead of [B, L, L]
are what flash_attention.py needs to skip tiles and to build each tile's mask.
"""
import jax
import jax.numpy as jnp


def key_ranges(segment_ids_BxL, image_ids_BxL):
  """(start_BxL, limit_BxL) int32: query q may attend key k iff start[q] <= k < limit[q].

  O(L) work (a cumulative max and a reversed cumulative min along the row), nothing [L, L], so
  it runs inside the jitted step on any backend.
  """
  segment_ids_BxL = segment_ids_BxL.astype(jnp.int32)
  image_ids_BxL = image_ids_BxL.astype(jnp.int32)
  length = segment_ids_BxL.shape[1]
  position_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids_BxL.shape)

  def shifted(x_BxL, by, fill):
    """x moved `by` positions along the row (positive: right), `fill` where nothing came in."""
    pad = jnp.full((x_BxL.shape[0], abs(by)), fill, x_BxL.dtype)
    if by > 0:
      return jnp.concatenate([pad, x_BxL[:, :-by]], axis=1)
    return jnp.concatenate([x_BxL[:, -by:], pad], axis=1)

  # A document starts where the segment id changes; the latest start at or before q is q's.
  doc_first_BxL = segment_ids_BxL != shifted(segment_ids_BxL, 1, -1)
  start_BxL = jax.lax.cummax(jnp.where(doc_first_BxL, position_BxL, 0), axis=1)
  # An image ends where its id stops repeating; the earliest end at or after a patch is its
  # image's (images are contiguous, so no other image's end lies in between).
  is_image_BxL = image_ids_BxL >= 0
  image_last_BxL = is_image_BxL & (image_ids_BxL != shifted(image_ids_BxL, -1, -1))
  next_image_last_BxL = jax.lax.cummin(jnp.where(image_last_BxL, position_BxL, length), axis=1,
                                       reverse=True)
  limit_BxL = jnp.where(is_image_BxL, next_image_last_BxL, position_BxL) + 1
  padding_BxL = segment_ids_BxL == 0
  return jnp.where(padding_BxL, 0, start_BxL), jnp.where(padding_BxL, 0, limit_BxL)


def mask_from_ranges(start_BxL, limit_BxL):
  """[B, 1, L, L] bool, the layout of attention.attention_mask (for tests and references)."""
  key_1x1xL = jnp.arange(start_BxL.shape[1])[None, None, :]
  allowed_BxLxL = (key_1x1xL >= start_BxL[:, :, None]) & (key_1x1xL < limit_BxL[:, :, None])
  return allowed_BxLxL[:, None]
