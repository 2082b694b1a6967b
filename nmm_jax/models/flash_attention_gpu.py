"""Flash attention under the packed multimodal mask, as Pallas GPU (Triton) kernels.

The GPU counterpart of flash_attention.py, with the same mask (one key range per query,
`start[q] <= k < limit[q]`, key_ranges.py), the same outputs, gradients and padding convention,
and the same pure-JAX helpers (padding to the block multiple, per-block TileBounds). Only the
kernels differ, written the way Triton runs: one program per (q block, batch, head) that keeps
its accumulators in registers and walks the k blocks with a `lax.fori_loop` from the block's
kv_lo to kv_hi, so skipped tiles cost nothing, not even a grid step (Triton has neither scalar
prefetch nor scratch buffers, so the TPU kernels' clamped index maps do not carry over). The
bounds arrive as ordinary inputs, one scalar block per program.

Masking. Each loop is split in three at the block's [full_lo, full_hi) (tiles inside every row's
range): masked, unmasked, masked. The tiles in the middle skip the iota compares and selects
with no branch inside the loop, which Triton would otherwise have to pipeline around.

Layout. q, k, v, out and their gradients stay [B, L, H, E]: a Triton block may be strided, so
a [block, E] slice of one head is read in place (rows of E contiguous elements) and nothing is
transposed to heads-major in HBM, unlike the TPU path. lse and delta are [B, H, L] f32 rows.

Backward: a dq kernel (grid like the forward's, looping k blocks in range) and a dk/dv kernel
over (k block, batch, kv head), looping the q blocks whose range holds its k block [q_lo, q_hi)
and, inside that, the G query heads of its group (one flattened loop, heads fastest, so the
mask's start/limit rows are reused from cache). Summing the G heads inside the program keeps
dk/dv in registers and writes each once, with no atomics and no [B, L, H, E] f32 partials to
reduce in XLA; the price is G times fewer programs than a per-query-head grid, which matters
only when B * K * L / block_k is below a few hundred (a few waves on 132 SMs).

GQA: the k/v block of query head h is kv head h // G (attention.py's grouping), chosen by the
index map; k and v are never repeated in memory.

Empty ranges (padding queries) give zero output and lse 0, and add nothing to dq/dk/dv: they
fall only into masked tiles (a block holding one makes full_hi 0), where their probabilities are
zeroed. The residual lse is natural-log, as the TPU kernels'; the kernels work in base 2: exp2
of logits pre-scaled by log2(e) / sqrt(E) folds exp's own multiply by log2(e) into the scale.
f32 inputs run IEEE f32 dots (the Triton lowering's default precision), not TF32.

Constraints (Triton tensors): E and both block sizes powers of two, at least 16 (the smallest
tl.dot). Runs on NVIDIA GPUs through the Triton lowering; on CPU pass `interpret=True` (Pallas'
HLO interpreter). num_warps/num_stages are a heuristic, not tuned on hardware.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from nmm_jax.models.flash_attention import pad_ranges, padded_length, tile_bounds

# Finite: a row that has met no allowed key yet keeps m = _MASKED, and exp2(m - m) stays finite.
_MASKED = -1e30
_LOG2E = math.log2(math.e)
_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def flash_attention_gpu(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, start_BxL, limit_BxL, *, block_q=64,
                        block_k=64, interpret=False):
  """softmax(q k^T / sqrt(E)) v with query q seeing keys start[q] <= k < limit[q]: [B, L, H, E]
  in q's dtype, f32 accumulation; zero rows where the range is empty. Differentiable in q, k, v.
  Same results as flash_attention.flash_attention, as Triton kernels.
  """
  b, l, h, e = q_BxLxHxE.shape
  kv_heads = k_BxLxKxE.shape[2]
  if h % kv_heads or k_BxLxKxE.shape != (b, l, kv_heads, e) or v_BxLxKxE.shape != k_BxLxKxE.shape:
    raise ValueError(f"q {q_BxLxHxE.shape}, k {k_BxLxKxE.shape}, v {v_BxLxKxE.shape}: expected "
                     f"[B, L, H, E] and [B, L, K, E] with K dividing H")
  for name, size in (("head dim", e), ("block_q", block_q), ("block_k", block_k)):
    if size < 16 or size & (size - 1):
      raise ValueError(f"{name} {size}: Triton needs a power of two, at least 16")
  length = padded_length(l, block_q, block_k)
  start_BxL, limit_BxL = pad_ranges(start_BxL, limit_BxL, length)
  bounds = tile_bounds(start_BxL, limit_BxL, block_q, block_k)
  # The kernels read the bounds by (row, block): kv_lo .. full_hi by q block, the rest by k block.
  blocks = (*bounds, *_full_q_run(bounds.full_lo, bounds.full_hi, length // block_k))
  pad = lambda x: jnp.pad(x, ((0, 0), (0, length - l), (0, 0), (0, 0)))
  out_BxLxHxE = _attention(pad(q_BxLxHxE), pad(k_BxLxKxE), pad(v_BxLxKxE), start_BxL, limit_BxL,
                           blocks, block_q, block_k, interpret)
  return out_BxLxHxE[:, :l]


def _full_q_run(full_lo_BxN, full_hi_BxN, num_k):
  """[B, M] (lo, hi): for each k block, a run of q blocks [lo, hi) whose tiles with it are all
  full (every row's range holds the k block). The first such run; the full tiles of a k block
  are one run when start and limit never decrease along the row (packed rows: documents in
  order, padding only at the end); any other full tile is computed masked, still correctly."""
  num_q = full_lo_BxN.shape[1]
  k_block_M = jnp.arange(num_k)
  full_BxNxM = (full_lo_BxN[:, :, None] <= k_block_M) & (k_block_M < full_hi_BxN[:, :, None])
  q_block_Nx1 = jnp.arange(num_q)[:, None]
  lo_BxM = jnp.where(jnp.any(full_BxNxM, axis=1), jnp.argmax(full_BxNxM, axis=1), num_q)
  ended_BxNxM = ~full_BxNxM & (q_block_Nx1 >= lo_BxM[:, None])
  hi_BxM = jnp.where(jnp.any(ended_BxNxM, axis=1), jnp.argmax(ended_BxNxM, axis=1), num_q)
  return lo_BxM.astype(jnp.int32), hi_BxM.astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, start, limit, blocks, block_q, block_k, interpret):
  return _forward(q, k, v, start, limit, blocks, block_q, block_k, interpret)[0]


def _attention_fwd(q, k, v, start, limit, blocks, block_q, block_k, interpret):
  out, lse = _forward(q, k, v, start, limit, blocks, block_q, block_k, interpret)
  return out, (q, k, v, start, limit, blocks, out, lse)


def _attention_bwd(block_q, block_k, interpret, residuals, d_out):
  q, k, v, start, limit, blocks, out, lse = residuals
  # dS = P * (dP - delta) with delta = rowsum(dO * O): one [B, H, L] reduction here, in f32.
  delta = jnp.sum(out.astype(_F32) * d_out.astype(_F32), axis=-1).transpose(0, 2, 1)
  args = (q, k, v, d_out, lse, delta, start, limit, blocks, block_q, block_k, interpret)
  dk, dv = _backward_dkv(*args)
  return _backward_dq(*args), dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _split_loop(lo, hi, full_lo, full_hi, tile, carry):
  """carry = tile(j, carry, masked) for j in [lo, hi), with masked=False on the part of
  [full_lo, full_hi) inside it: three loops with static bodies, no branch per tile."""
  hi = jnp.maximum(hi, lo)  # an empty block has lo = M, hi = 0
  mid_lo = jnp.clip(full_lo, lo, hi)
  mid_hi = jnp.clip(full_hi, mid_lo, hi)
  carry = jax.lax.fori_loop(lo, mid_lo, functools.partial(tile, masked=True), carry)
  carry = jax.lax.fori_loop(mid_lo, mid_hi, functools.partial(tile, masked=False), carry)
  return jax.lax.fori_loop(mid_hi, hi, functools.partial(tile, masked=True), carry)


def _allowed(start, limit, key_offset, shape, key_axis):
  """Tile mask: key (iota along key_axis + key_offset) in [start, limit) of its query; start and
  limit broadcast along the key axis ([Q, 1] columns or [1, Q] rows)."""
  key = key_offset + jax.lax.broadcasted_iota(jnp.int32, shape, key_axis)
  return (key >= start) & (key < limit)


def _dot(a, b, dims):
  return jax.lax.dot_general(a, b, dims, preferred_element_type=_F32)


def _compiler_params(block_q, block_k, e):
  # Register budget: [block, E] f32 accumulators and a [block_q, block_k] f32 tile per program;
  # past 64 x 64 tiles or E 64 they spread over 8 warps rather than spill.
  small = block_q * block_k <= 64 * 64 and e <= 64
  return plgpu.CompilerParams(num_warps=4 if small else 8, num_stages=2)


def _specs(shape_q, kv_heads, length, block_q):
  """Block specs of a (q block, batch, head) grid: [block_q, E] q-shaped blocks, the head's kv
  head over the whole length, [block_q] rows of [B, H, L] and of [B, L], and one scalar of a
  [B, N] bound."""
  _, _, h, e = shape_q
  groups = h // kv_heads
  q_block = pl.BlockSpec((None, block_q, None, e), lambda i, b, h_: (b, i, h_, 0))
  kv_block = pl.BlockSpec((None, length, None, e), lambda i, b, h_: (b, 0, h_ // groups, 0))
  head_row = pl.BlockSpec((None, None, block_q), lambda i, b, h_: (b, h_, i))
  range_row = pl.BlockSpec((None, block_q), lambda i, b, h_: (b, i))
  bound = pl.BlockSpec((None, None), lambda i, b, h_: (b, i))
  return q_block, kv_block, head_row, range_row, bound


def _call(kernel, name, grid, in_specs, out_specs, out_shape, block_q, block_k, interpret,
          *operands):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compiler_params(block_q, block_k, operands[0].shape[-1]),
      interpret=interpret, name=name)(*operands)


def _forward_kernel(q_ref, k_ref, v_ref, start_ref, limit_ref, kv_lo_ref, kv_hi_ref, full_lo_ref,
                    full_hi_ref, out_ref, lse_ref, *, block_k):
  q_QxE = q_ref[...]
  block_q, e = q_QxE.shape
  scale = e ** -0.5 * _LOG2E
  start_Qx1, limit_Qx1 = start_ref[...][:, None], limit_ref[...][:, None]

  def tile(j, carry, masked):
    acc_QxE, m_Q, l_Q = carry
    keys = pl.ds(j * block_k, block_k)
    s_QxK = _dot(q_QxE, k_ref[keys, :], _NT) * scale
    if masked:
      allowed_QxK = _allowed(start_Qx1, limit_Qx1, j * block_k, s_QxK.shape, 1)
      s_QxK = jnp.where(allowed_QxK, s_QxK, _MASKED)
    m_next_Q = jnp.maximum(m_Q, jnp.max(s_QxK, axis=1))
    alpha_Q = jnp.exp2(m_Q - m_next_Q)
    p_QxK = jnp.exp2(s_QxK - m_next_Q[:, None])
    if masked:  # a row with no allowed key so far has m = _MASKED and exp2(0) = 1 here
      p_QxK = jnp.where(allowed_QxK, p_QxK, 0.0)
    l_next_Q = alpha_Q * l_Q + jnp.sum(p_QxK, axis=1)
    v_KxE = v_ref[keys, :]
    acc_QxE = alpha_Q[:, None] * acc_QxE + _dot(p_QxK.astype(v_KxE.dtype), v_KxE, _NN)
    return acc_QxE, m_next_Q, l_next_Q

  init = (jnp.zeros((block_q, e), _F32), jnp.full((block_q,), _MASKED, _F32),
          jnp.zeros((block_q,), _F32))
  acc_QxE, m_Q, l_Q = _split_loop(kv_lo_ref[...], kv_hi_ref[...], full_lo_ref[...],
                                  full_hi_ref[...], tile, init)
  seen_Q = l_Q > 0.0  # false only for empty ranges: their acc is 0
  l_Q = jnp.where(seen_Q, l_Q, 1.0)
  out_ref[...] = (acc_QxE / l_Q[:, None]).astype(out_ref.dtype)
  lse_ref[...] = jnp.where(seen_Q, (m_Q + jnp.log2(l_Q)) / _LOG2E, 0.0)


def _forward(q, k, v, start, limit, blocks, block_q, block_k, interpret):
  b, length, h, _ = q.shape
  q_block, kv_block, head_row, range_row, bound = _specs(q.shape, k.shape[2], length, block_q)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, length), _F32)]
  # q blocks vary fastest over the programs: neighbours share a head's k/v, warm in L2.
  return _call(functools.partial(_forward_kernel, block_k=block_k), "flash_attention_gpu_fwd",
               (length // block_q, b, h),
               [q_block, kv_block, kv_block, range_row, range_row] + [bound] * 4,
               [q_block, head_row], out_shape, block_q, block_k, interpret,
               q, k, v, start, limit, *blocks[:4])


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, start_ref, limit_ref, kv_lo_ref,
               kv_hi_ref, full_lo_ref, full_hi_ref, dq_ref, *, block_k):
  q_QxE, do_QxE = q_ref[...], do_ref[...]
  block_q, e = q_QxE.shape
  scale = e ** -0.5 * _LOG2E
  lse_Qx1 = lse_ref[...][:, None] * _LOG2E
  delta_Qx1 = delta_ref[...][:, None]
  start_Qx1, limit_Qx1 = start_ref[...][:, None], limit_ref[...][:, None]

  def tile(j, dq_QxE, masked):
    keys = pl.ds(j * block_k, block_k)
    k_KxE = k_ref[keys, :]
    p_QxK = jnp.exp2(_dot(q_QxE, k_KxE, _NT) * scale - lse_Qx1)
    if masked:  # also zeroes the rows of empty ranges, whose lse 0 is no normaliser
      p_QxK = jnp.where(_allowed(start_Qx1, limit_Qx1, j * block_k, p_QxK.shape, 1), p_QxK, 0.0)
    dp_QxK = _dot(do_QxE, v_ref[keys, :], _NT)
    ds_QxK = p_QxK * (dp_QxK - delta_Qx1)
    return dq_QxE + _dot(ds_QxK.astype(k_KxE.dtype), k_KxE, _NN)

  dq_QxE = _split_loop(kv_lo_ref[...], kv_hi_ref[...], full_lo_ref[...], full_hi_ref[...], tile,
                       jnp.zeros((block_q, e), _F32))
  dq_ref[...] = (dq_QxE * e ** -0.5).astype(dq_ref.dtype)


def _backward_dq(q, k, v, d_out, lse, delta, start, limit, blocks, block_q, block_k, interpret):
  b, length, h, _ = q.shape
  q_block, kv_block, head_row, range_row, bound = _specs(q.shape, k.shape[2], length, block_q)
  in_specs = [q_block, kv_block, kv_block, q_block, head_row, head_row, range_row, range_row]
  return _call(functools.partial(_dq_kernel, block_k=block_k), "flash_attention_gpu_dq",
               (length // block_q, b, h), in_specs + [bound] * 4, q_block,
               jax.ShapeDtypeStruct(q.shape, q.dtype), block_q, block_k, interpret,
               q, k, v, d_out, lse, delta, start, limit, *blocks[:4])


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, start_ref, limit_ref, q_lo_ref,
                q_hi_ref, full_lo_ref, full_hi_ref, dk_ref, dv_ref, *, block_q, groups):
  k_KxE, v_KxE = k_ref[...], v_ref[...]
  block_k, e = k_KxE.shape
  scale = e ** -0.5 * _LOG2E
  key_offset = pl.program_id(0) * block_k

  def tile(t, carry, masked):
    # t = q block * G + head in group: the heads of one q block run back to back.
    dk_KxE, dv_KxE = carry
    g = jax.lax.rem(t, groups)
    queries = pl.ds(jax.lax.div(t, groups) * block_q, block_q)
    # Transposed scores [keys, queries]: dk and dv are then plain (K x Q) @ (Q x E) matmuls, and
    # the per-query rows (lse, delta, ranges) broadcast along the key axis.
    q_QxE, do_QxE = q_ref[queries, g, :], do_ref[queries, g, :]
    p_KxQ = jnp.exp2(_dot(k_KxE, q_QxE, _NT) * scale - lse_ref[g, queries][None, :] * _LOG2E)
    if masked:
      allowed_KxQ = _allowed(start_ref[queries][None, :], limit_ref[queries][None, :],
                             key_offset, p_KxQ.shape, 0)
      p_KxQ = jnp.where(allowed_KxQ, p_KxQ, 0.0)
    dv_KxE = dv_KxE + _dot(p_KxQ.astype(do_QxE.dtype), do_QxE, _NN)
    dp_KxQ = _dot(v_KxE, do_QxE, _NT)
    ds_KxQ = p_KxQ * (dp_KxQ - delta_ref[g, queries][None, :])
    return dk_KxE + _dot(ds_KxQ.astype(q_QxE.dtype), q_QxE, _NN), dv_KxE

  zeros = jnp.zeros((block_k, e), _F32)
  dk_KxE, dv_KxE = _split_loop(*(ref[...] * groups for ref in (q_lo_ref, q_hi_ref, full_lo_ref,
                                                               full_hi_ref)), tile, (zeros, zeros))
  dk_ref[...] = (dk_KxE * e ** -0.5).astype(dk_ref.dtype)
  dv_ref[...] = dv_KxE.astype(dv_ref.dtype)


def _backward_dkv(q, k, v, d_out, lse, delta, start, limit, blocks, block_q, block_k, interpret):
  b, length, h, e = q.shape
  kv_heads = k.shape[2]
  groups = h // kv_heads
  # Grid (k block, batch, kv head); a program reads its group's G query heads over the length.
  group_block = pl.BlockSpec((None, length, groups, e), lambda j, b_, kh: (b_, 0, kh, 0))
  group_rows = pl.BlockSpec((None, groups, length), lambda j, b_, kh: (b_, kh, 0))
  ranges = pl.BlockSpec((None, length), lambda j, b_, kh: (b_, 0))
  kv_block = pl.BlockSpec((None, block_k, None, e), lambda j, b_, kh: (b_, j, kh, 0))
  bound = pl.BlockSpec((None, None), lambda j, b_, kh: (b_, j))
  in_specs = [group_block, kv_block, kv_block, group_block, group_rows, group_rows, ranges,
              ranges] + [bound] * 4
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  kernel = functools.partial(_dkv_kernel, block_q=block_q, groups=groups)
  # blocks[4:]: q_lo, q_hi (TileBounds), then the full-tile run of _full_q_run, all per k block.
  return _call(kernel, "flash_attention_gpu_dkv", (length // block_k, b, kv_heads), in_specs,
               [kv_block, kv_block], out_shape, block_q, block_k, interpret,
               q, k, v, d_out, lse, delta, start, limit, *blocks[4:])
