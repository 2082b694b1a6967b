"""The forward-only LM head: per-token negative log-likelihood from the final hidden states,
computed chunk by chunk along the sequence so no [tokens, vocab] logits array is ever whole
(scoring, the eval step, and the forward half of the fused training loss in train/loss.py).
"""
import jax
import jax.numpy as jnp

from nmm_jax import sharding


def chunked(x_BxL, chunk: int):
  """[B, L, ...] -> [L/chunk, B, chunk, ...]: chunks along the sequence keep batch sharding."""
  b, l = x_BxL.shape[:2]
  return jnp.moveaxis(x_BxL.reshape(b, l // chunk, chunk, *x_BxL.shape[2:]), 1, 0)


def unchunked(x_NxBxC, shape):
  return jnp.moveaxis(x_NxBxC, 0, 1).reshape(shape)


def chunk_logits(h_BxCxD, head_DxV):
  """Logits in f32 from compute-dtype operands: the matmul runs at the bf16 rate and
  accumulates in f32 (the softmax over 50k entries needs it)."""
  # A chunk's positions are never split (the vocabulary is, over tensor).
  h_BxCxD = sharding.constrain(h_BxCxD, ("batch", None, "activation_embed"))
  logits_BxCxV = jnp.einsum("bcd,dv->bcv", h_BxCxD, head_DxV.astype(h_BxCxD.dtype),
                            preferred_element_type=jnp.float32)
  return sharding.constrain(logits_BxCxV, ("batch", None, "activation_vocab"))


def nll_from_logits(logits_BxCxV, targets_BxC):
  lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
  target_logit_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
  return lse_BxC, lse_BxC - target_logit_BxC


def token_nll(hidden_BxLxD, head_DxV, targets_BxL, chunk: int):
  """Per-token negative log-likelihood [B, L] (f32), chunked along L; forward only."""
  def body(_, xs):
    h_BxCxD, t_BxC = xs
    return None, nll_from_logits(chunk_logits(h_BxCxD, head_DxV), t_BxC)[1]
  _, nll = jax.lax.scan(body, None, (chunked(hidden_BxLxD, chunk), chunked(targets_BxL, chunk)))
  return unchunked(nll, targets_BxL.shape)
