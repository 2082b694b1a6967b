"""Next-token cross-entropy on text targets, and its per-source breakdown.

The LM head and the loss are fused (`weighted_nll`): over a vocabulary of 32k, the [tokens, vocab]
logits and their gradient dominate memory traffic. The loss weights (mask / token count) are
known in the forward pass, so the gradients of the weighted sum are computed there, chunk by
chunk along the sequence, while each chunk's logits are hot in cache; the backward pass only
scales them by the incoming cotangent. Same FLOPs as the plain version (6·T·D·V), no [T, V]
array, and no recomputation.
"""
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from nmm_jax import sharding
from nmm_jax.models import dense
from nmm_jax.models.lm_head import chunk_logits, chunked, nll_from_logits, token_nll, unchunked

# The head's logical axes; a tied head (the embedding transposed) has the same.
HEAD_AXES = ("embed", "vocab")


def _sum_of_parts(d_head_PxDxV, head_shape, dtype):
  """The head gradient in `dtype` (the head's) from the batch parts' f32 partial sums, in the
  head's FSDP shards. On TPU (models/dense.py's EXPLICIT_PLATFORMS) reduce-scattered
  explicitly in the head's dtype, as the dense projections' gradients are: half the bytes of
  the f32 reduce-scatter libtpu makes of the plain sum (early-275m on v5p-8 with a vocabulary
  of 50,688: 20 against 40 MiB). At some widths, the paper's 50,304 among them, libtpu
  all-reduces the whole gradient either way (README, "Training")."""
  plan = dense.reduction(d_head_PxDxV.shape[0], head_shape, HEAD_AXES)
  if plan is None:
    return jnp.sum(d_head_PxDxV, axis=0).astype(dtype)
  # Each device's own part is summed in f32, then reduced in the head's dtype, as
  # models/dense.py reduces the projections' gradients.
  return plan.total(lambda g_pxDxV: jnp.sum(g_pxDxV, axis=0).astype(dtype),
                    (PartitionSpec(plan.batch, *plan.features),), d_head_PxDxV)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def weighted_nll(hidden_BxLxD, head_DxV, targets_BxL, weights_BxL, chunk: int):
  """(sum(weights * nll), nll [B, L]). Differentiable in hidden and head through the sum only:
  the per-token nll output is for metrics and carries no gradient."""
  nll_BxL = token_nll(hidden_BxLxD, head_DxV, targets_BxL, chunk)
  return jnp.sum(nll_BxL * weights_BxL), nll_BxL


def _weighted_nll_fwd(hidden_BxLxD, head_DxV, targets_BxL, weights_BxL, chunk):
  dtype = hidden_BxLxD.dtype
  head_c = head_DxV.astype(dtype)
  # The head gradient is a sum over tokens, which are split over the batch axes. Summed across
  # devices chunk by chunk, it would cost a [D, V] f32 all-reduce (or reduce-scatter) per chunk,
  # 32 of them per step at seq 2048: each device keeps its own partial sum instead (row p of
  # d_head_PxDxV lives on the devices holding batch part p) and they are reduced once, after
  # the loop. The price is one whole [D, V] f32 array per device.
  b = hidden_BxLxD.shape[0]
  p = sharding.parts("batch", b)
  partial_axes = ("batch", None, "activation_vocab")

  def per_part(x_BxCx):
    return x_BxCx.reshape(p, b // p, *x_BxCx.shape[1:])

  def body(d_head_PxDxV, xs):
    h_BxCxD, t_BxC, w_BxC = xs
    logits_BxCxV = chunk_logits(h_BxCxD, head_DxV)
    lse_BxC, nll_BxC = nll_from_logits(logits_BxCxV, t_BxC)
    # d(w * nll)/d logits = w * (softmax - onehot(target)). (Measured on XLA:CPU: sharing one exp
    # pass with the logsumexp, scattering the onehot, or flattening tokens for the head gradient
    # are all slower than this.)
    d_logits_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None]) * w_BxC[..., None]
    d_logits_BxCxV = d_logits_BxCxV - jax.nn.one_hot(t_BxC, head_DxV.shape[1]) * w_BxC[..., None]
    # The two gradient matmuls take compute-dtype operands and accumulate in f32, like the
    # forward one (in f32 runs this is the f32 computation).
    d_logits_BxCxV = d_logits_BxCxV.astype(dtype)
    d_h_BxCxD = jnp.einsum("bcv,dv->bcd", d_logits_BxCxV, head_c,
                           preferred_element_type=jnp.float32).astype(dtype)
    d_head_PxDxV = d_head_PxDxV + sharding.constrain(
        jnp.einsum("pbcd,pbcv->pdv", per_part(h_BxCxD), per_part(d_logits_BxCxV),
                   preferred_element_type=jnp.float32), partial_axes)
    return d_head_PxDxV, (nll_BxC, d_h_BxCxD)

  xs = (chunked(hidden_BxLxD, chunk), chunked(targets_BxL, chunk), chunked(weights_BxL, chunk))
  zeros_PxDxV = sharding.constrain(jnp.zeros((p, *head_DxV.shape), jnp.float32), partial_axes)
  d_head_PxDxV, (nll, d_h) = jax.lax.scan(body, zeros_PxDxV, xs)
  d_head_DxV = _sum_of_parts(d_head_PxDxV, head_DxV.shape, head_DxV.dtype)
  nll_BxL = unchunked(nll, targets_BxL.shape)
  residuals = (unchunked(d_h, hidden_BxLxD.shape), d_head_DxV)
  return (jnp.sum(nll_BxL * weights_BxL), nll_BxL), residuals


def _weighted_nll_bwd(chunk, residuals, cotangents):
  del chunk
  d_hidden, d_head = residuals
  # The cotangent of the sum is f32; each gradient keeps the dtype of its primal (bf16 hidden
  # states, f32 head), as a custom VJP must.
  g_sum = cotangents[0]
  return (g_sum * d_hidden.astype(jnp.float32)).astype(d_hidden.dtype), g_sum * d_head, None, None


weighted_nll.defvjp(_weighted_nll_fwd, _weighted_nll_bwd)


def loss_sums(nll_BxL, batch, num_sources: int):
  """Sums of masked NLL and of scored tokens, overall and per source.

  Sums rather than means so several batches (evaluation) aggregate exactly.
  """
  mask_BxL = batch["loss_mask"]
  onehot_BxLxS = (batch["source"][..., None] == jnp.arange(num_sources)).astype(jnp.float32)
  weighted_BxLxS = onehot_BxLxS * mask_BxL[..., None]
  return {
      "nll": jnp.sum(nll_BxL * mask_BxL),
      "count": jnp.sum(mask_BxL),
      "nll_per_source": jnp.einsum("bl,bls->s", nll_BxL, weighted_BxLxS),
      "count_per_source": jnp.sum(weighted_BxLxS, axis=(0, 1)),
  }


def losses_from_sums(sums, source_names, prefix=""):
  """{"loss": mean, "loss/<source>": mean...} for the sources present in the batch."""
  out = {f"{prefix}loss": float(sums["nll"]) / max(float(sums["count"]), 1.0)}
  for i, name in enumerate(source_names):
    count = float(sums["count_per_source"][i])
    if count > 0:
      out[f"{prefix}loss/{name}"] = float(sums["nll_per_source"][i]) / count
  return out
