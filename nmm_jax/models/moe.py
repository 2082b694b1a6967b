"""Mixture-of-experts MLP: token-choice top-k routing over SwiGLU experts.

Dropless (default, `moe.capacity_factor=0`): the token-expert assignments are sorted by expert and
each expert's contiguous group goes through one grouped matmul (`jax.lax.ragged_dot`); no token
is dropped. Capacity path (`capacity_factor > 0`, for comparison): each expert takes at most
ceil(factor * tokens * k / experts) assignments in token order, the rest are dropped (counted).

Routing (`moe.routing`): "learned" (modality-agnostic: one router over all experts, the paper's
winner) or "modality" (hard: image tokens choose among the first half of the experts, text tokens
among the second half).

Auxiliary losses (returned, weighted by the caller): Switch-style load balance
E * sum_e f_e * P_e (f_e: share of assignments to expert e, P_e: mean router probability; 1 for
a uniform router) and the router z-loss mean(logsumexp(logits)^2). Both over real tokens only.

Shape suffixes as in layers.py, plus N tokens, X experts, K top-k, A = N*K assignments,
C capacity.
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx

from nmm_jax.models.layers import fan_in_init, make_param

ROUTINGS = ("learned", "modality")


class MoEMLP(nnx.Module):
  def __init__(self, d_model: int, mlp_dim: int, moe, *, param_dtype, rngs: nnx.Rngs):
    x = moe.num_experts
    self.num_experts, self.top_k = x, moe.top_k
    self.routing, self.capacity_factor = moe.routing, moe.capacity_factor
    self.w_router_DxX = make_param(rngs, fan_in_init(), (d_model, x), ("embed", None),
                                   param_dtype)
    self.w_gate_XxDxF = make_param(rngs, _expert_init(),
                                   (x, d_model, mlp_dim), ("exp", "embed", "mlp"), param_dtype)
    self.w_up_XxDxF = make_param(rngs, _expert_init(), (x, d_model, mlp_dim),
                                 ("exp", "embed", "mlp"), param_dtype)
    self.w_down_XxFxD = make_param(rngs, _expert_init(), (x, mlp_dim, d_model),
                                   ("exp", "mlp", "embed"), param_dtype)

  def route(self, x_NxD, is_image_N):
    """(router logits [N, X] f32, top-k expert ids [N, K], their weights [N, K])."""
    logits_NxX = (x_NxD @ self.w_router_DxX[...].astype(x_NxD.dtype)).astype(jnp.float32)
    scores_NxX = logits_NxX
    if self.routing == "modality":
      half = self.num_experts // 2
      image_expert_X = jnp.arange(self.num_experts) < half
      allowed_NxX = image_expert_X[None, :] == is_image_N[:, None]
      scores_NxX = jnp.where(allowed_NxX, logits_NxX, -1e30)
    probs_NxX = jax.nn.softmax(scores_NxX, axis=-1)
    top_probs_NxK, top_ids_NxK = jax.lax.top_k(probs_NxX, self.top_k)
    weights_NxK = top_probs_NxK / jnp.sum(top_probs_NxK, axis=-1, keepdims=True)
    return scores_NxX, probs_NxX, top_ids_NxK, weights_NxK

  def _experts(self, x_AxD, group_sizes_X):
    cast = lambda p: p[...].astype(x_AxD.dtype)
    gate = jax.lax.ragged_dot(x_AxD, cast(self.w_gate_XxDxF), group_sizes_X)
    up = jax.lax.ragged_dot(x_AxD, cast(self.w_up_XxDxF), group_sizes_X)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, cast(self.w_down_XxFxD), group_sizes_X)

  def __call__(self, x_BxLxD, is_image_BxL, valid_BxL):
    """(output [B, L, D], stats): stats has the aux losses and per-expert assignment counts of
    image and text tokens, and the number of dropped assignments."""
    b, l, d = x_BxLxD.shape
    n, k, e = b * l, self.top_k, self.num_experts
    x_NxD = x_BxLxD.reshape(n, d)
    is_image_N, valid_N = is_image_BxL.reshape(n), valid_BxL.reshape(n).astype(jnp.float32)
    scores_NxX, probs_NxX, top_ids_NxK, weights_NxK = self.route(x_NxD, is_image_N)

    expert_A = top_ids_NxK.reshape(n * k)
    order_A = jnp.argsort(expert_A, stable=True)  # assignments grouped by expert, token order kept
    token_A = order_A // k
    sorted_expert_A = expert_A[order_A]
    group_sizes_X = jnp.bincount(expert_A, length=e).astype(jnp.int32)
    keep_A = jnp.ones((n * k,), bool)
    if self.capacity_factor > 0:
      capacity = math.ceil(self.capacity_factor * n * k / e)
      group_start_X = jnp.cumsum(group_sizes_X) - group_sizes_X
      rank_A = jnp.arange(n * k) - group_start_X[sorted_expert_A]
      keep_A = rank_A < capacity
    out_sorted_AxD = self._experts(x_NxD[token_A], group_sizes_X)
    out_sorted_AxD = jnp.where(keep_A[:, None], out_sorted_AxD, 0)
    out_AxD = jnp.zeros_like(out_sorted_AxD).at[order_A].set(out_sorted_AxD)
    y_NxD = jnp.einsum("nkd,nk->nd", out_AxD.reshape(n, k, d), weights_NxK.astype(x_NxD.dtype))

    # Statistics over real tokens (padding excluded).
    assigned_NxX = jax.nn.one_hot(top_ids_NxK, e, dtype=jnp.float32).sum(axis=1)
    real = jnp.maximum(valid_N.sum(), 1.0)
    share_X = (assigned_NxX * valid_N[:, None]).sum(0) / (real * k)
    mean_prob_X = (probs_NxX * valid_N[:, None]).sum(0) / real
    lse_N = jax.nn.logsumexp(scores_NxX, axis=-1)
    image_N = is_image_N.astype(jnp.float32) * valid_N
    kept_N = jnp.zeros((n,), jnp.float32).at[token_A].add(keep_A.astype(jnp.float32))
    stats = {
        "load_balance": e * jnp.sum(share_X * mean_prob_X),
        "z_loss": jnp.sum(jnp.square(lse_N) * valid_N) / real,
        "image_per_expert": (assigned_NxX * image_N[:, None]).sum(0),
        "text_per_expert": (assigned_NxX * (valid_N - image_N)[:, None]).sum(0),
        "dropped": jnp.sum((k - kept_N) * valid_N),
    }
    return y_NxD.reshape(b, l, d), stats


def _expert_init():
  """Each expert's matrix initialised like a dense layer's: fan-in = its own input dim."""
  def init(key, shape, dtype):
    return jax.random.normal(key, shape, dtype) * (shape[1] ** -0.5)
  return init
