"""Next-token cross-entropy on text targets, and its per-source breakdown."""
import jax.numpy as jnp
import optax


def token_nll(hidden_BxLxD, head_DxV, targets_BxL):
  """Per-token negative log-likelihood [B, L] (f32)."""
  logits_BxLxV = jnp.einsum("bld,dv->blv", hidden_BxLxD, head_DxV.astype(hidden_BxLxD.dtype))
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV.astype(jnp.float32),
                                                         targets_BxL)


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
