"""Mixture-of-experts MLP: token-choice top-k routing over SwiGLU experts, expert-parallel.

Routing (`moe.routing`): "learned" (modality-agnostic: one router over all experts, the paper's
winner) or "modality" (hard: image tokens choose among the first half of the experts, text tokens
among the second half). Routing and statistics run on the whole batch; the experts run in
`expert_exchange` below, inside a shard_map over the mesh when one is set (`jax.set_mesh`).

Expert parallelism: tokens are split over the batch axes (sharding.batch_axes: data, fsdp,
expert by default), the experts over
`expert` and their hidden width over `tensor`. Each device sends every token-expert assignment
to the device that holds the expert with one `all_to_all` over the `expert` axis, the experts
compute, a second `all_to_all` brings the outputs back, and a `psum` over `tensor` adds the
partial products of the down projection.

Two compute paths:
* Dropless (default, `moe.capacity_factor=0`): the received assignments are sorted by local
  expert and go through one grouped matmul (`jax.lax.ragged_dot`); no token is dropped. The
  exchange buffers have a static size, so they hold the worst case (all of a device's
  assignments bound for one device): with ep devices on the `expert` axis that is ep times the
  assignments, the volume of an all-gather. `jax.lax.ragged_all_to_all` would send only the real
  counts, but XLA:CPU does not implement it, so it could not be tested here.
* Capacity (`capacity_factor > 0`, the GShard layout, for comparison): each expert takes at most
  C = ceil(factor * L * K / X) assignments of each sequence, earliest tokens first, so a drop
  depends only on earlier tokens of the same sequence and not on the batch or the sharding; the
  rest are dropped (counted; the residual carries them). Buffers are [X, C] slots per sequence
  and the experts run as one batched einsum, no sort.

Auxiliary losses (returned, weighted by the caller): Switch-style load balance
E * sum_e f_e * P_e (f_e: share of assignments to expert e, P_e: mean router probability; 1 for
a uniform router) and the router z-loss mean(logsumexp(logits)^2). Both over real tokens only.

Shape suffixes as in layers.py, plus N tokens, X experts (local ones inside the exchange),
K top-k, A = N*K assignments, P devices on the expert axis, S exchange slots, C capacity.
"""
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from nmm_jax import sharding
from nmm_jax.models.layers import fan_in_init, make_param

ROUTINGS = ("learned", "modality")
# Inside the exchange: tokens over the batch axes of the traced sharding rules, experts over
# EXPERT_AXIS, the expert hidden width over TENSOR_AXIS (the default rules' layout; other
# parameter layouts are resharded to this one at the shard_map boundary).
EXPERT_AXIS, TENSOR_AXIS = "expert", "tensor"


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
    logits_NxX = jnp.matmul(x_NxD, self.w_router_DxX[...].astype(x_NxD.dtype),
                            preferred_element_type=jnp.float32)
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

  def _run_experts(self, x_BxLxD, expert_BxLxK, weights_BxLxK):
    """(output [B, L, D], kept [B, L, K]): in a shard_map over the mesh when one is set and
    the batch splits over its token axes, else as one program (GSPMD places it)."""
    dtype = x_BxLxD.dtype
    params = [p[...].astype(dtype) for p in (self.w_gate_XxDxF, self.w_up_XxDxF,
                                              self.w_down_XxFxD)]
    exchange = functools.partial(expert_exchange, num_experts=self.num_experts,
                                 capacity_factor=self.capacity_factor)
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes = sharding.batch_axes(sharding.traced_rules())
    if mesh.empty or not set(batch_axes + (EXPERT_AXIS, TENSOR_AXIS)) <= set(mesh.axis_names):
      return exchange(x_BxLxD, expert_BxLxK, weights_BxLxK, *params)
    token_axes = tuple(a for a in batch_axes if mesh.shape[a] > 1)
    if x_BxLxD.shape[0] % math.prod(mesh.shape[a] for a in token_axes):
      return exchange(x_BxLxD, expert_BxLxK, weights_BxLxK, *params)
    ep, tp = mesh.shape[EXPERT_AXIS], mesh.shape[TENSOR_AXIS]
    # Size-1 axes are left out of the specs: naming one would mark the values as varying
    # over it, and the outputs as not replicated.
    tokens = PartitionSpec(token_axes or None)
    experts, hidden = EXPERT_AXIS if ep > 1 else None, TENSOR_AXIS if tp > 1 else None
    in_ffn, out_ffn = PartitionSpec(experts, None, hidden), PartitionSpec(experts, hidden, None)
    sharded = jax.shard_map(
        functools.partial(exchange, expert_axis=experts, tensor_axis=hidden),
        mesh=mesh, in_specs=(tokens, tokens, tokens, in_ffn, in_ffn, out_ffn),
        out_specs=(tokens, tokens))
    return sharded(x_BxLxD, expert_BxLxK, weights_BxLxK, *params)

  def __call__(self, x_BxLxD, is_image_BxL, valid_BxL):
    """(output [B, L, D], stats): stats has the aux losses and per-expert assignment counts of
    image and text tokens, and the number of dropped assignments."""
    b, l, d = x_BxLxD.shape
    n, k, e = b * l, self.top_k, self.num_experts
    is_image_N, valid_N = is_image_BxL.reshape(n), valid_BxL.reshape(n).astype(jnp.float32)
    scores_NxX, probs_NxX, top_ids_NxK, weights_NxK = self.route(x_BxLxD.reshape(n, d),
                                                                 is_image_N)
    y_BxLxD, kept_BxLxK = self._run_experts(x_BxLxD, top_ids_NxK.reshape(b, l, k),
                                            weights_NxK.reshape(b, l, k))

    # Statistics over real tokens (padding excluded).
    assigned_NxX = jax.nn.one_hot(top_ids_NxK, e, dtype=jnp.float32).sum(axis=1)
    real = jnp.maximum(valid_N.sum(), 1.0)
    share_X = (assigned_NxX * valid_N[:, None]).sum(0) / (real * k)
    mean_prob_X = (probs_NxX * valid_N[:, None]).sum(0) / real
    lse_N = jax.nn.logsumexp(scores_NxX, axis=-1)
    image_N = is_image_N.astype(jnp.float32) * valid_N
    kept_N = kept_BxLxK.reshape(n, k).astype(jnp.float32).sum(-1)
    stats = {
        "load_balance": e * jnp.sum(share_X * mean_prob_X),
        "z_loss": jnp.sum(jnp.square(lse_N) * valid_N) / real,
        "image_per_expert": (assigned_NxX * image_N[:, None]).sum(0),
        "text_per_expert": (assigned_NxX * (valid_N - image_N)[:, None]).sum(0),
        "dropped": jnp.sum((k - kept_N) * valid_N),
    }
    return y_BxLxD, stats


def expert_exchange(x_BxLxD, expert_BxLxK, weights_BxLxK, w_gate_XxDxF, w_up_XxDxF,
                    w_down_XxFxD, *, num_experts, capacity_factor, expert_axis=None,
                    tensor_axis=None):
  """One device's part of the MoE MLP: (y [B, L, D], kept [B, L, K]).

  Its tokens, their global expert ids and weights; the weights of its local experts (all of
  them without an expert axis). `expert_axis`/`tensor_axis`: the mesh axes to exchange over
  (None: not split)."""
  b, l, d = x_BxLxD.shape
  k = expert_BxLxK.shape[-1]
  local_experts = w_gate_XxDxF.shape[0]
  ep = jax.lax.axis_size(expert_axis) if expert_axis else 1
  n, a = b * l, b * l * k
  x_NxD = x_BxLxD.reshape(n, d)
  expert_A = expert_BxLxK.reshape(a)
  token_A = jnp.arange(a) // k
  dest_A, local_A = expert_A // local_experts, expert_A % local_experts

  def exchange(buffer):  # [P, ...] by destination -> [P, ...] by source, and back again
    return jax.lax.all_to_all(buffer, expert_axis, 0, 0) if expert_axis else buffer

  if capacity_factor > 0:
    capacity = math.ceil(capacity_factor * l * k / num_experts)
    row_A = token_A // l
    rank_A = _rank_in_bucket(row_A * num_experts + expert_A, b * num_experts)
    keep_A = rank_A < capacity
    # Slot of each kept assignment in its expert's buffer; dropped ones point past the end.
    slot_A = jnp.where(keep_A, row_A * capacity + rank_A, b * capacity)
    send_PxXxSxD = jnp.zeros((ep, local_experts, b * capacity, d), x_NxD.dtype)
    send_PxXxSxD = send_PxXxSxD.at[dest_A, local_A, slot_A].set(x_NxD[token_A], mode="drop")
    recv_PxXxSxD = exchange(send_PxXxSxD)
    h_XxSxD = recv_PxXxSxD.transpose(1, 0, 2, 3).reshape(local_experts, ep * b * capacity, d)
    gate_XxSxF = jnp.einsum("xsd,xdf->xsf", h_XxSxD, w_gate_XxDxF)
    up_XxSxF = jnp.einsum("xsd,xdf->xsf", h_XxSxD, w_up_XxDxF)
    out_XxSxD = jnp.einsum("xsf,xfd->xsd", jax.nn.silu(gate_XxSxF) * up_XxSxF, w_down_XxFxD)
    out_PxXxSxD = exchange(out_XxSxD.reshape(local_experts, ep, b * capacity, d)
                           .transpose(1, 0, 2, 3))
    out_AxD = out_PxXxSxD.at[dest_A, local_A, slot_A].get(mode="fill", fill_value=0)
  else:
    keep_A = jnp.ones((a,), bool)
    if expert_axis:
      # Slot of each assignment in its destination's buffer; empty slots carry the id
      # `local_experts`, which sorts after every real expert and joins no group.
      slot_A = _rank_in_bucket(dest_A, ep)
      send_PxAxD = jnp.zeros((ep, a, d), x_NxD.dtype).at[dest_A, slot_A].set(x_NxD[token_A])
      send_id_PxA = jnp.full((ep, a), local_experts, jnp.int32).at[dest_A, slot_A].set(local_A)
      h_RxD = exchange(send_PxAxD).reshape(ep * a, d)
      id_R = exchange(send_id_PxA).reshape(ep * a)
    else:
      h_RxD, id_R = x_NxD[token_A], local_A
    order_R = jnp.argsort(id_R, stable=True)
    group_sizes_X = jnp.bincount(id_R, length=local_experts).astype(jnp.int32)
    h_RxD = h_RxD[order_R]
    gate_RxF = jax.lax.ragged_dot(h_RxD, w_gate_XxDxF, group_sizes_X)
    up_RxF = jax.lax.ragged_dot(h_RxD, w_up_XxDxF, group_sizes_X)
    out_RxD = jax.lax.ragged_dot(jax.nn.silu(gate_RxF) * up_RxF, w_down_XxFxD, group_sizes_X)
    out_RxD = jnp.where((id_R[order_R] < local_experts)[:, None], out_RxD, 0)
    out_RxD = jnp.zeros_like(out_RxD).at[order_R].set(out_RxD)
    if expert_axis:
      out_AxD = exchange(out_RxD.reshape(ep, a, d))[dest_A, slot_A]
    else:
      out_AxD = out_RxD

  y_NxD = jnp.einsum("nkd,nk->nd", out_AxD.reshape(n, k, d), weights_BxLxK.reshape(n, k)
                     .astype(x_NxD.dtype))
  if tensor_axis:
    y_NxD = jax.lax.psum(y_NxD, tensor_axis)
  return y_NxD.reshape(b, l, d), keep_A.reshape(b, l, k)


def _rank_in_bucket(bucket_A, num_buckets):
  """For each item, how many items before it (in order) share its bucket."""
  order_A = jnp.argsort(bucket_A, stable=True)
  sizes = jnp.bincount(bucket_A, length=num_buckets)
  start = jnp.cumsum(sizes) - sizes
  rank_sorted_A = jnp.arange(bucket_A.shape[0]) - start[bucket_A[order_A]]
  return jnp.zeros_like(bucket_A).at[order_A].set(rank_sorted_A)


def _expert_init():
  """Each expert's matrix initialised like a dense layer's: fan-in = its own input dim."""
  def init(key, shape, dtype):
    return jax.random.normal(key, shape, dtype) * (shape[1] ** -0.5)
  return init
