"""Mixture-of-experts MLP: token-choice top-k routing over SwiGLU experts, expert-parallel.

Routing (`moe.routing`): "learned" (modality-agnostic: one router over all experts, the paper's
winner) or "modality" (hard: image tokens choose among the first half of the experts, text tokens
among the second half). The weights of the chosen experts are their router probabilities: at
top-1 the output is scaled by it (Switch), so the loss trains the router; at top-k > 1 they are
renormalised to sum 1 with `moe.normalize_topk` (Mixtral, Qwen3-MoE) or not (DeepSeek).
Balancing (`moe.balance`): the Switch loss below, or "bias", DeepSeek-V3's auxiliary-loss-free
balancing: a per-expert bias (RouterBias, not a parameter) added to the probabilities for the
choice only, moved after each step by the step's loads (`update_router_bias`, train/step.py).
`moe.num_shared_experts`: an always-on SwiGLU beside the routed experts (DeepSeek's shared
experts). Routing and statistics run on the whole batch; the experts run in `expert_exchange`
below, inside a shard_map over the mesh when one is set (`jax.set_mesh`).

Expert parallelism: tokens are split over the batch axes (sharding.batch_axes: data, fsdp,
expert by default), the experts over `expert` and their hidden width over `tensor`. Each
assignment goes to the device that holds its expert, the experts compute, the outputs come
back, and a `psum` over `tensor` adds the partial products of the down projection.

Two compute paths:
* Dropless (default, `moe.capacity_factor=0`): the received assignments are sorted by local
  expert and go through one grouped matmul per projection (models/grouped_matmul.py,
  `moe.grouped_matmul`: "auto" = the megablox Pallas kernel on TPU, XLA's ragged_dot elsewhere).
  The exchange (`moe.exchange`):
  - "all_to_all": fixed [P, A] buffers by destination, one all_to_all each way. Every device
    sends its worst case (all its assignments bound for one device): the volume of an
    all-gather. The CPU path (XLA:CPU has no ragged_all_to_all).
  - "ragged": the per-expert counts are all-gathered, then only the real rows travel, by
    jax.lax.ragged_all_to_all. The receive buffer still has the worst-case size (dropless),
    but megablox computes only its filled rows. "auto": ragged on TPU and GPU.
* Capacity (`capacity_factor > 0`, the GShard layout, for comparison): each expert takes at most
  C = ceil(factor * L * K / X) assignments of each sequence, earliest tokens first, so a drop
  depends only on earlier tokens of the same sequence and not on the batch or the sharding; the
  rest are dropped (counted; the residual carries them). Buffers are [X, C] slots per sequence
  and the experts run as one batched einsum, no sort.

On GPU the dropless default is ragged_dot (XLA's grouped matmul lowering) with the ragged
exchange: XLA:GPU lowers ragged_dot itself, and JAX ships no Pallas grouped-matmul kernel for
GPUs; the capacity path (plain batched einsums, cuBLAS) stays available for comparison.

Auxiliary losses (returned, weighted by the caller): Switch-style load balance
E * sum_e f_e * P_e (f_e: share of assignments to expert e, P_e: mean router probability; 1 for
a uniform router) and the router z-loss mean(logsumexp(logits)^2). Both over real tokens only.

Shape suffixes as in layers.py, plus N tokens, X experts (local ones inside the exchange),
E all experts, K top-k, A = N*K assignments, P devices on the expert axis, R received rows,
S exchange slots, C capacity.
"""
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from nmm_jax import sharding
from nmm_jax.models import grouped_matmul as grouped_matmul_lib
from nmm_jax.models.layers import SwiGLU, fan_in_init, make_param

ROUTINGS = ("learned", "modality")
# Inside the exchange: tokens over the batch axes of the traced sharding rules, experts over
# EXPERT_AXIS, the expert hidden width over TENSOR_AXIS (the default rules' layout; other
# parameter layouts are resharded to this one at the shard_map boundary).
EXPERT_AXIS, TENSOR_AXIS = "expert", "tensor"


class RouterBias(nnx.Variable):
  """moe.balance="bias": the per-expert selection bias [X]. Not a parameter: no gradient reaches
  it (it only moves the top-k choice) and the optimizer leaves it alone; the train step sets it
  from the step's expert loads (`update_router_bias`). Checkpointed with the parameters."""


class MoEMLP(nnx.Module):
  def __init__(self, d_model: int, mlp_dim: int, moe, *, param_dtype, rngs: nnx.Rngs):
    x = moe.num_experts
    self.num_experts, self.top_k = x, moe.top_k
    self.routing, self.capacity_factor = moe.routing, moe.capacity_factor
    self.normalize_topk = moe.normalize_topk
    self.grouped_matmul, self.exchange = moe.grouped_matmul, moe.exchange
    self.exchange_capacity = moe.exchange_capacity
    self.w_router_DxX = make_param(rngs, fan_in_init(), (d_model, x), ("embed", None),
                                   param_dtype)
    self.w_gate_XxDxF = make_param(rngs, _expert_init(),
                                   (x, d_model, mlp_dim), ("exp", "embed", "mlp"), param_dtype)
    self.w_up_XxDxF = make_param(rngs, _expert_init(), (x, d_model, mlp_dim),
                                 ("exp", "embed", "mlp"), param_dtype)
    self.w_down_XxFxD = make_param(rngs, _expert_init(), (x, mlp_dim, d_model),
                                   ("exp", "mlp", "embed"), param_dtype)
    if moe.balance == "bias":
      self.router_bias_X = RouterBias(jnp.zeros((x,), jnp.float32), out_sharding=(None,),
                                      eager_sharding=False)
    if moe.num_shared_experts:
      self.shared = SwiGLU(d_model, moe.num_shared_experts * mlp_dim, param_dtype=param_dtype,
                           rngs=rngs)

  def route(self, x_NxD, is_image_N):
    """(router scores [N, X] f32, probabilities [N, X], top-k expert ids [N, K], their weights
    [N, K]). The choice is by probability (+ the balancing bias with moe.balance="bias"); the
    weights are the chosen probabilities, renormalised when top_k > 1 and normalize_topk."""
    logits_NxX = jnp.matmul(x_NxD, self.w_router_DxX[...].astype(x_NxD.dtype),
                            preferred_element_type=jnp.float32)
    scores_NxX = logits_NxX
    allowed_NxX = None
    if self.routing == "modality":
      allowed_NxX = modality_experts(self.num_experts)[None, :] == is_image_N[:, None]
      scores_NxX = jnp.where(allowed_NxX, logits_NxX, -1e30)
    probs_NxX = jax.nn.softmax(scores_NxX, axis=-1)
    choice_NxX = probs_NxX
    if hasattr(self, "router_bias_X"):
      choice_NxX = probs_NxX + self.router_bias_X[...][None, :]
      if allowed_NxX is not None:  # the bias must not open the other modality's experts
        choice_NxX = jnp.where(allowed_NxX, choice_NxX, -jnp.inf)
    _, top_ids_NxK = jax.lax.top_k(choice_NxX, self.top_k)
    top_probs_NxK = jnp.take_along_axis(probs_NxX, top_ids_NxK, axis=-1)
    weights_NxK = top_probs_NxK
    if self.top_k > 1 and self.normalize_topk:
      weights_NxK = top_probs_NxK / jnp.sum(top_probs_NxK, axis=-1, keepdims=True)
    return scores_NxX, probs_NxX, top_ids_NxK, weights_NxK

  def _run_experts(self, x_BxLxD, expert_BxLxK, weights_BxLxK):
    """(output [B, L, D], kept [B, L, K]): in a shard_map over the mesh when one is set and
    the batch splits over its token axes, else as one program (GSPMD places it)."""
    dtype = x_BxLxD.dtype
    params = [p[...].astype(dtype) for p in (self.w_gate_XxDxF, self.w_up_XxDxF,
                                              self.w_down_XxFxD)]
    exchange = functools.partial(expert_exchange, num_experts=self.num_experts,
                                 capacity_factor=self.capacity_factor,
                                 grouped_matmul=self.grouped_matmul, exchange=self.exchange,
                                 exchange_capacity=self.exchange_capacity)
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
    # check_vma off: a pallas_call's outputs (megablox) carry no record of the mesh axes they
    # vary over. The gradients stay those of one device (test_moe's expert-parallel tests).
    sharded = jax.shard_map(
        functools.partial(exchange, expert_axis=experts, tensor_axis=hidden),
        mesh=mesh, in_specs=(tokens, tokens, tokens, in_ffn, in_ffn, out_ffn),
        out_specs=(tokens, tokens), check_vma=False)
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
    if hasattr(self, "shared"):
      y_BxLxD = y_BxLxD + self.shared(x_BxLxD)

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
        # A sum and a count, not their ratio: the train step divides by the whole batch's
        # real tokens, so microbatches give the batch's mean exactly.
        "z_loss_sum": jnp.sum(jnp.square(lse_N) * valid_N),
        "real_tokens": valid_N.sum(),
        "image_per_expert": (assigned_NxX * image_N[:, None]).sum(0),
        "text_per_expert": (assigned_NxX * (valid_N - image_N)[:, None]).sum(0),
        "dropped": jnp.sum((k - kept_N) * valid_N),
    }
    return y_BxLxD, stats


def expert_exchange(x_BxLxD, expert_BxLxK, weights_BxLxK, w_gate_XxDxF, w_up_XxDxF,
                    w_down_XxFxD, *, num_experts, capacity_factor, grouped_matmul="ragged_dot",
                    exchange="all_to_all", exchange_capacity=0.0, expert_axis=None,
                    tensor_axis=None):
  """One device's part of the MoE MLP: (y [B, L, D], kept [B, L, K]).

  Its tokens, their global expert ids and weights; the weights of its local experts (all of
  them without an expert axis). `grouped_matmul` (dropless): "ragged_dot", "megablox" or
  "auto"; `exchange` (dropless, with an expert axis): "all_to_all", "ragged" or "auto", and
  `exchange_capacity` its receive buffer (see the module docstring). `expert_axis` /
  `tensor_axis`: the mesh axes to exchange over (None: not split)."""
  b, l, d = x_BxLxD.shape
  k = expert_BxLxK.shape[-1]
  local_experts = w_gate_XxDxF.shape[0]
  n, a = b * l, b * l * k
  x_NxD = x_BxLxD.reshape(n, d)
  expert_A = expert_BxLxK.reshape(a)
  if capacity_factor > 0:
    out_AxD, keep_A = _capacity_experts(x_NxD, expert_A, w_gate_XxDxF, w_up_XxDxF, w_down_XxFxD,
                                        rows=b, capacity=math.ceil(capacity_factor * l * k
                                                                   / num_experts),
                                        num_experts=num_experts, expert_axis=expert_axis)
  else:
    ffn = functools.partial(_grouped_ffn, w_gate_XxDxF=w_gate_XxDxF, w_up_XxDxF=w_up_XxDxF,
                            w_down_XxFxD=w_down_XxFxD, implementation=grouped_matmul)
    h_AxD = x_NxD[jnp.arange(a) // k]
    if not expert_axis:
      out_AxD, keep_A = ffn(h_AxD, expert_A), jnp.ones((a,), bool)
    else:
      ep = jax.lax.axis_size(expert_axis)
      receive_rows = ep * a if not exchange_capacity else min(
          ep * a, math.ceil(exchange_capacity * a))
      dispatch = functools.partial(_dispatch, h_AxD, expert_A, ffn, local_experts=local_experts,
                                   expert_axis=expert_axis, receive_rows=receive_rows)
      if exchange == "auto":  # ragged_all_to_all where XLA implements it (not XLA:CPU)
        out_AxD, keep_A = jax.lax.platform_dependent(
            tpu=functools.partial(dispatch, ragged=True),
            cuda=functools.partial(dispatch, ragged=True),
            rocm=functools.partial(dispatch, ragged=True),
            default=functools.partial(dispatch, ragged=False))
      else:
        out_AxD, keep_A = dispatch(ragged=exchange == "ragged")

  y_NxD = jnp.einsum("nkd,nk->nd", out_AxD.reshape(n, k, d), weights_BxLxK.reshape(n, k)
                     .astype(x_NxD.dtype))
  if tensor_axis:
    y_NxD = jax.lax.psum(y_NxD, tensor_axis)
  return y_NxD.reshape(b, l, d), keep_A.reshape(b, l, k)


def _grouped_ffn(h_RxD, id_R, *, w_gate_XxDxF, w_up_XxDxF, w_down_XxFxD, implementation):
  """The local experts' SwiGLU over rows with local expert ids (id >= local experts: an empty
  slot, output 0), rows sorted by expert for one grouped matmul per projection and back."""
  local_experts = w_gate_XxDxF.shape[0]
  order_R = jnp.argsort(id_R, stable=True)
  group_sizes_X = jnp.bincount(id_R, length=local_experts).astype(jnp.int32)
  h_RxD = h_RxD[order_R]

  def matmuls(impl, interpret=False):
    mm = functools.partial(grouped_matmul_lib.grouped_matmul, group_sizes_X=group_sizes_X,
                           implementation=impl, interpret=interpret)
    gate_RxF = mm(h_RxD, w_gate_XxDxF)
    up_RxF = mm(h_RxD, w_up_XxDxF)
    return mm(jax.nn.silu(gate_RxF) * up_RxF, w_down_XxFxD)

  if implementation == "ragged_dot":
    out_RxD = matmuls("ragged_dot")
  else:  # the Mosaic kernel on TPU; "megablox" elsewhere runs it in Pallas' interpreter
    off_tpu = (functools.partial(matmuls, "megablox", interpret=True)
               if implementation == "megablox" else functools.partial(matmuls, "ragged_dot"))
    out_RxD = jax.lax.platform_dependent(tpu=functools.partial(matmuls, "megablox"),
                                         default=off_tpu)
  # Empty slots sort last, past the groups: grouped_matmul gives them zeros.
  return jnp.zeros_like(out_RxD).at[order_R].set(out_RxD)


def _dispatch(h_AxD, expert_A, ffn, *, local_experts, expert_axis, receive_rows, ragged):
  """Expert parallelism, dropless up to the receive buffer: each assignment sent to the device
  holding its expert, the experts applied there (`ffn(rows, local ids)`), the outputs sent
  back. Returns (outputs [A, D], kept [A]).

  Both forms sort the assignments by expert (so by destination, then local expert) and
  all-gather the per-expert counts first ([P, E] ints). A receiver takes the sources' runs
  back to back in source order, up to `receive_rows` rows; a run that would overflow loses its
  tail (its last experts' rows: dropped, counted, carried by the residual). Every device works
  the same plan out from the counts (`exchange_plan`), so both forms drop alike.
  ragged=False: fixed [P, A] buffers by destination, one all_to_all each way (every device
  sends its worst case, P * A rows, and the rows' expert ids): the CPU form. ragged=True: only
  the kept rows travel, by ragged_all_to_all, into a [receive_rows, D] buffer; the receiver
  knows each row's expert from the counts, and megablox computes only the filled rows."""
  ep = jax.lax.axis_size(expert_axis)
  a, d = h_AxD.shape
  plan = exchange_plan(expert_A, local_experts, expert_axis, receive_rows)
  if not ragged:
    dest_A, local_A = expert_A // local_experts, expert_A % local_experts
    # Dropped assignments point past the buffer; empty slots carry the id `local_experts`,
    # which sorts after every real expert and joins no group.
    slot_A = jnp.where(plan.keep_A, plan.rank_A, a)
    send_PxAxD = jnp.zeros((ep, a, d), h_AxD.dtype).at[dest_A, slot_A].set(h_AxD, mode="drop")
    send_id_PxA = jnp.full((ep, a), local_experts, jnp.int32).at[dest_A, slot_A].set(
        local_A, mode="drop")
    exchange = lambda buf: jax.lax.all_to_all(buf, expert_axis, 0, 0)
    out_RxD = ffn(exchange(send_PxAxD).reshape(ep * a, d), exchange(send_id_PxA).reshape(ep * a))
    out_AxD = exchange(out_RxD.reshape(ep, a, d)).at[dest_A, slot_A].get(mode="fill",
                                                                         fill_value=0)
    return out_AxD, plan.keep_A

  o = plan.offsets
  h_RxD = jax.lax.ragged_all_to_all(
      h_AxD[plan.order_A], jnp.zeros((receive_rows, d), h_AxD.dtype), o.input, o.send_sizes,
      o.output, o.recv_sizes, axis_name=expert_axis)
  out_RxD = ffn(h_RxD, received_expert_ids(plan.received_PxX, receive_rows))
  # Back: each source's rows from where they landed here to where they left from there; the
  # dropped rows' places stay zero.
  back_AxD = jax.lax.ragged_all_to_all(
      out_RxD, jnp.zeros((a, d), out_RxD.dtype), o.recv_offsets, o.recv_sizes, o.back_output,
      o.send_sizes, axis_name=expert_axis)
  return jnp.zeros_like(back_AxD).at[plan.order_A].set(back_AxD), plan.keep_A


class RaggedOffsets(NamedTuple):
  """One device's ragged_all_to_all arguments, from every device's per-destination counts."""
  send_sizes: jax.Array    # [P] rows this device sends to each device (its kept rows)
  input: jax.Array         # [P] where each of its runs starts in its destination-sorted rows
  output: jax.Array        # [P] where its run lands in each destination's receive buffer
  recv_sizes: jax.Array    # [P] rows it receives from each device
  recv_offsets: jax.Array  # [P] where each source's run lands in its own receive buffer
  back_output: jax.Array   # [P] the return trip: where its rows land at each source (that
                           # source's `input` for this device)


def ragged_offsets(sizes_PxP, kept_PxP, me):
  """RaggedOffsets of device `me` from sizes_PxP[source, destination] (the runs as the senders
  lay them out) and kept_PxP (the rows of each run the destination takes). Receive buffers
  hold the kept runs back to back in source order."""
  sent_before_PxP = jnp.cumsum(sizes_PxP, axis=1) - sizes_PxP    # sender's own offsets
  landed_before_PxP = jnp.cumsum(kept_PxP, axis=0) - kept_PxP    # receiver's offsets
  return RaggedOffsets(
      send_sizes=kept_PxP[me], input=sent_before_PxP[me], output=landed_before_PxP[me],
      recv_sizes=kept_PxP[:, me], recv_offsets=landed_before_PxP[:, me],
      back_output=sent_before_PxP[:, me])


class ExchangePlan(NamedTuple):
  order_A: jax.Array       # [A] the assignments sorted by expert
  rank_A: jax.Array        # [A] each one's place in its run to its destination
  keep_A: jax.Array        # [A] whether its destination has room for it
  offsets: RaggedOffsets
  received_PxX: jax.Array  # [P, X] rows received from each source for each local expert


def exchange_plan(expert_A, local_experts, expert_axis, receive_rows):
  """What each device sends where and what fits, from the all-gathered per-expert counts."""
  ep, a = jax.lax.axis_size(expert_axis), expert_A.shape[0]
  me = jax.lax.axis_index(expert_axis)
  order_A = jnp.argsort(expert_A, stable=True)
  counts_PxE = jax.lax.all_gather(jnp.bincount(expert_A, length=ep * local_experts)
                                  .astype(jnp.int32), expert_axis)  # [source, expert]
  sizes_PxP = counts_PxE.reshape(ep, ep, local_experts).sum(-1)
  before_PxP = jnp.cumsum(sizes_PxP, axis=0) - sizes_PxP  # rows of earlier sources
  kept_PxP = jnp.clip(receive_rows - before_PxP, 0, sizes_PxP)
  offsets = ragged_offsets(sizes_PxP, kept_PxP, me)
  dest_sorted_A = expert_A[order_A] // local_experts
  rank_sorted_A = jnp.arange(a) - offsets.input[dest_sorted_A]
  keep_sorted_A = rank_sorted_A < offsets.send_sizes[dest_sorted_A]
  mine_PxX = jax.lax.dynamic_slice_in_dim(counts_PxE, me * local_experts, local_experts, axis=1)
  # A truncated run keeps its first experts' rows.
  earlier_PxX = jnp.cumsum(mine_PxX, axis=1) - mine_PxX
  received_PxX = jnp.clip(offsets.recv_sizes[:, None] - earlier_PxX, 0, mine_PxX)
  return ExchangePlan(order_A=order_A,
                      rank_A=jnp.zeros_like(order_A).at[order_A].set(rank_sorted_A),
                      keep_A=jnp.zeros((a,), bool).at[order_A].set(keep_sorted_A),
                      offsets=offsets, received_PxX=received_PxX)


def received_expert_ids(counts_PxX, rows):
  """[rows] local expert of each row of a receive buffer that holds, source after source, each
  source's rows sorted by local expert (counts_PxX[source, expert] of them); `X` (no expert)
  for the unused rows past them."""
  ends = jnp.cumsum(counts_PxX.reshape(-1))  # runs in (source, expert) order
  run_R = jnp.searchsorted(ends, jnp.arange(rows), side="right")
  local_experts = counts_PxX.shape[1]
  return jnp.where(run_R < ends.shape[0], run_R % local_experts, local_experts).astype(jnp.int32)


def _capacity_experts(x_NxD, expert_A, w_gate_XxDxF, w_up_XxDxF, w_down_XxFxD, *, rows,
                      capacity, num_experts, expert_axis):
  """The capacity path: (outputs [A, D], kept [A]). Each expert takes at most `capacity`
  assignments of each sequence, earliest first, into [X, C] slots per sequence; the experts run
  as one batched einsum."""
  a, d = expert_A.shape[0], x_NxD.shape[1]
  k = a // x_NxD.shape[0]
  local_experts = w_gate_XxDxF.shape[0]
  ep = jax.lax.axis_size(expert_axis) if expert_axis else 1
  token_A = jnp.arange(a) // k
  dest_A, local_A = expert_A // local_experts, expert_A % local_experts
  exchange = ((lambda buf: jax.lax.all_to_all(buf, expert_axis, 0, 0)) if expert_axis
              else (lambda buf: buf))
  row_A = token_A // (x_NxD.shape[0] // rows)
  rank_A = _rank_in_bucket(row_A * num_experts + expert_A, rows * num_experts)
  keep_A = rank_A < capacity
  # Slot of each kept assignment in its expert's buffer; dropped ones point past the end.
  slot_A = jnp.where(keep_A, row_A * capacity + rank_A, rows * capacity)
  send_PxXxSxD = jnp.zeros((ep, local_experts, rows * capacity, d), x_NxD.dtype)
  send_PxXxSxD = send_PxXxSxD.at[dest_A, local_A, slot_A].set(x_NxD[token_A], mode="drop")
  recv_PxXxSxD = exchange(send_PxXxSxD)
  h_XxSxD = recv_PxXxSxD.transpose(1, 0, 2, 3).reshape(local_experts, ep * rows * capacity, d)
  gate_XxSxF = jnp.einsum("xsd,xdf->xsf", h_XxSxD, w_gate_XxDxF)
  up_XxSxF = jnp.einsum("xsd,xdf->xsf", h_XxSxD, w_up_XxDxF)
  out_XxSxD = jnp.einsum("xsf,xfd->xsd", jax.nn.silu(gate_XxSxF) * up_XxSxF, w_down_XxFxD)
  out_PxXxSxD = exchange(out_XxSxD.reshape(local_experts, ep, rows * capacity, d)
                         .transpose(1, 0, 2, 3))
  return out_PxXxSxD.at[dest_A, local_A, slot_A].get(mode="fill", fill_value=0), keep_A


def modality_experts(num_experts):
  """[X] bool: the image experts of modality routing (the first half)."""
  return jnp.arange(num_experts) < num_experts // 2


def is_router_bias(path) -> bool:
  """Whether a parameter-tree path (jax.tree_util keys) leads to a RouterBias value."""
  return any(getattr(k, "key", None) == "router_bias_X" for k in path)


def update_router_bias(bias_UxX, load_UxX, rate, routing):
  """DeepSeek-V3's balancing step: each expert's bias moves by `rate` towards balance, up when
  it received fewer assignments than the mean, down when more. Under modality routing the
  mean is taken within each half (image tokens can only reach the image experts, so the two
  halves' loads are not comparable)."""
  if routing == "modality":
    image_X = modality_experts(bias_UxX.shape[-1])
    mean_image_Ux1 = jnp.mean(load_UxX, -1, keepdims=True, where=image_X)
    mean_text_Ux1 = jnp.mean(load_UxX, -1, keepdims=True, where=~image_X)
    mean_UxX = jnp.where(image_X, mean_image_Ux1, mean_text_Ux1)
  else:
    mean_UxX = jnp.mean(load_UxX, -1, keepdims=True)
  return bias_UxX + rate * jnp.sign(mean_UxX - load_UxX)


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
