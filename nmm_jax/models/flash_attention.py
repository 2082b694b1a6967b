"""Flash attention under the packed multimodal mask, as Pallas TPU (Mosaic) kernels.

The mask is one key range per query (key_ranges.py: `start[q] <= k < limit[q]`), so a kernel
never needs an [L, L] array: each tile builds its mask from two [block_q] vectors and an iota.
Scores live only tile by tile in VMEM; the forward saves the log-sum-exp per query row and the
backward recomputes the probabilities from it.

Tile skipping. For a q block, the k blocks that may hold an allowed key are one contiguous range
[min start // block_k, ceil(max limit / block_k)) over the block's non-empty rows; tiles inside
every row's range need no element mask. These per-block bounds (TileBounds, small int arrays)
are computed once per call in XLA and reach the kernels as scalar-prefetch operands (SMEM):
`pl.when` skips the work of tiles outside the range, and the k/v index_map clamps the block index
into the range, so skipped grid steps name a block that is already resident and Pallas elides
their copies. The backward's dk/dv kernel walks q blocks for each k block, over the range of q
blocks whose forward range holds that k block.

Backward: two kernels, dq (grid like the forward's, reducing over k blocks) and dk/dv (reducing
over the query heads of a kv head and over q blocks). Each writes its output once from an f32
VMEM accumulator, with no atomics and no [k blocks, L, H, E] partial dq to sum in XLA; the price
is computing q k^T and the exponentials twice.

GQA: K kv heads serve H = G * K query heads, kv head j serving query heads j*G .. j*G+G-1 (as
attention.py). The index maps pick the kv head from the query head, so k and v are never repeated
in memory; dk/dv accumulate over the G heads of their group in VMEM.

Empty ranges (padding queries) give zero output and lse 0, and add nothing to dk/dv. The plain
reference (attention.py) instead spreads such a query uniformly over all keys, since its mask
value is finite; the two agree on every non-padding row, and on all gradients when the output's
cotangent is zero at padding rows (it is: padding carries no loss).

Runs on TPU (Mosaic); not on GPU (Pallas' GPU lowerings take neither scalar prefetch nor VMEM
scratch). On CPU pass `interpret=`: True runs the grid as a loop in Pallas' HLO interpreter;
`pltpu.InterpretParams()` (the tests') simulates the TPU's memories, so scratch starts as NaN
and out-of-bounds block reads raise. Block sizes on TPU: multiples of 128 (the ranges and lse
travel as [1, block] row blocks).
"""
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Finite: a row that has met no allowed key yet keeps m = _MASKED, and exp(m - m) stays finite.
_MASKED = -1e30
_LANES = 128  # m and l scratch are lane-replicated (block_q, 128), as Mosaic likes them
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_F32 = jnp.float32


class TileBounds(NamedTuple):
  """Per-block bounds of one call, int32. N q blocks, M k blocks per row."""
  kv_lo: jax.Array    # [B, N] first k block any row of the q block may see (M if none)
  kv_hi: jax.Array    # [B, N] one past the last (0 if none)
  full_lo: jax.Array  # [B, N] k blocks [full_lo, full_hi) lie inside every row's range:
  full_hi: jax.Array  # [B, N] those tiles need no element mask
  q_lo: jax.Array     # [B, M] first q block whose range holds k block j (N if none)
  q_hi: jax.Array     # [B, M] one past the last (0 if none)


def _cdiv(a, b):
  return -(-a // b)


def padded_length(length, block_q, block_k):
  """The sequence length the kernels run at: a multiple of both block sizes."""
  step = math.lcm(block_q, block_k)
  return _cdiv(length, step) * step


def pad_ranges(start_BxL, limit_BxL, length):
  """Ranges of padded queries are empty; padded keys lie outside every range already."""
  pad = ((0, 0), (0, length - start_BxL.shape[1]))
  return (jnp.pad(start_BxL.astype(jnp.int32), pad), jnp.pad(limit_BxL.astype(jnp.int32), pad))


def tile_bounds(start_BxL, limit_BxL, block_q, block_k):
  """TileBounds of ranges whose length is already a multiple of both block sizes."""
  b, l = start_BxL.shape
  num_q, num_k = l // block_q, l // block_k
  start_BxNxQ = start_BxL.reshape(b, num_q, block_q)
  limit_BxNxQ = limit_BxL.reshape(b, num_q, block_q)
  nonempty_BxNxQ = limit_BxNxQ > start_BxNxQ
  kv_lo = jnp.min(jnp.where(nonempty_BxNxQ, start_BxNxQ, l), axis=2) // block_k
  kv_hi = _cdiv(jnp.max(jnp.where(nonempty_BxNxQ, limit_BxNxQ, 0), axis=2), block_k)
  # An empty row (start = limit = 0) makes min(limit) 0: no tile of its block is full.
  full_lo = _cdiv(jnp.max(start_BxNxQ, axis=2), block_k)
  full_hi = jnp.min(limit_BxNxQ, axis=2) // block_k
  visited_BxNxM = _visited(kv_lo, kv_hi, num_k)
  any_BxM = jnp.any(visited_BxNxM, axis=1)
  q_lo = jnp.where(any_BxM, jnp.argmax(visited_BxNxM, axis=1), num_q)
  q_hi = jnp.where(any_BxM, num_q - jnp.argmax(visited_BxNxM[:, ::-1], axis=1), 0)
  return TileBounds(*(x.astype(jnp.int32) for x in (kv_lo, kv_hi, full_lo, full_hi, q_lo, q_hi)))


def _visited(kv_lo_BxN, kv_hi_BxN, num_k):
  k_block_M = jnp.arange(num_k)
  return (kv_lo_BxN[:, :, None] <= k_block_M) & (k_block_M < kv_hi_BxN[:, :, None])


def visited_tiles(start_BxL, limit_BxL, block_q, block_k, seq_len=None):
  """[B, N, M] bool: the (q block, k block) tiles the forward kernel computes, from the same
  bounds it uses; ranges are padded to the kernels' length for `seq_len` (default: L)."""
  length = padded_length(seq_len or start_BxL.shape[1], block_q, block_k)
  bounds = tile_bounds(*pad_ranges(start_BxL, limit_BxL, length), block_q, block_k)
  return _visited(bounds.kv_lo, bounds.kv_hi, length // block_k)


def flash_attention(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, start_BxL, limit_BxL, *, block_q=512,
                    block_k=512, interpret=False):
  """softmax(q k^T / sqrt(E)) v with query q seeing keys start[q] <= k < limit[q]: [B, L, H, E]
  in q's dtype, f32 accumulation; zero rows where the range is empty. Differentiable in q, k, v.
  """
  b, l, h, e = q_BxLxHxE.shape
  kv_heads = k_BxLxKxE.shape[2]
  if h % kv_heads or k_BxLxKxE.shape != (b, l, kv_heads, e) or v_BxLxKxE.shape != k_BxLxKxE.shape:
    raise ValueError(f"q {q_BxLxHxE.shape}, k {k_BxLxKxE.shape}, v {v_BxLxKxE.shape}: expected "
                     f"[B, L, H, E] and [B, L, K, E] with K dividing H")
  length = padded_length(l, block_q, block_k)
  start_BxL, limit_BxL = pad_ranges(start_BxL, limit_BxL, length)
  bounds = tile_bounds(start_BxL, limit_BxL, block_q, block_k)

  def heads_major(x_BxLxHxE):
    # The kernels' blocks are [block, E] slices of one head: the last two dims of the array.
    x_BxLxHxE = jnp.pad(x_BxLxHxE, ((0, 0), (0, length - l), (0, 0), (0, 0)))
    return x_BxLxHxE.transpose(0, 2, 1, 3)

  out_BxHxLxE = _attention(heads_major(q_BxLxHxE), heads_major(k_BxLxKxE),
                           heads_major(v_BxLxKxE), start_BxL[:, None], limit_BxL[:, None], bounds,
                           block_q, block_k, interpret)
  return out_BxHxLxE.transpose(0, 2, 1, 3)[:, :l]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, start, limit, bounds, block_q, block_k, interpret):
  return _forward(q, k, v, start, limit, bounds, block_q, block_k, interpret)[0]


def _attention_fwd(q, k, v, start, limit, bounds, block_q, block_k, interpret):
  out, lse = _forward(q, k, v, start, limit, bounds, block_q, block_k, interpret)
  return out, (q, k, v, start, limit, bounds, out, lse)


def _attention_bwd(block_q, block_k, interpret, residuals, d_out):
  q, k, v, start, limit, bounds, out, lse = residuals
  # dS = P * (dP - delta) with delta = rowsum(dO * O): one [B, H, L] reduction here, in f32.
  delta = jnp.sum(out.astype(_F32) * d_out.astype(_F32), axis=-1)[:, :, None, :]
  args = (q, k, v, d_out, lse, delta, start, limit, bounds, block_q, block_k, interpret)
  dk, dv = _backward_dkv(*args)
  return _backward_dq(*args), dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _clamp(index, lo, hi):
  """The block a grid step loads: `index` inside [lo, hi), else the nearer end, so the steps
  outside the range name an already resident block (Pallas skips a copy when a block index
  repeats); block 0 for an empty range."""
  return jnp.minimum(jnp.maximum(index, lo), jnp.maximum(hi - 1, 0))


def _tile_status(kv_lo_ref, kv_hi_ref, full_lo_ref, full_hi_ref, q_block, k_block):
  """(visit, full) of tile (q_block, k_block), from the scalar-prefetch bounds (flattened)."""
  visit = (kv_lo_ref[q_block] <= k_block) & (k_block < kv_hi_ref[q_block])
  full = (full_lo_ref[q_block] <= k_block) & (k_block < full_hi_ref[q_block])
  return visit, full


def _run_tile(visit, full, tile):
  """tile(masked) on visited tiles; the element mask only where some row sees part of it."""
  pl.when(visit & full)(lambda: tile(False))
  pl.when(visit & jnp.logical_not(full))(lambda: tile(True))


def _allowed(start, limit, key_offset, shape, key_axis):
  """Tile mask: key (iota along key_axis + key_offset) in [start, limit) of its query; start and
  limit broadcast along the key axis ([Q, 1] columns or [1, Q] rows)."""
  key = key_offset + jax.lax.broadcasted_iota(jnp.int32, shape, key_axis)
  return (key >= start) & (key < limit)


def _column(row_ref):
  """A [1, Q] row block as a [Q, 1] column (queries along sublanes)."""
  return row_ref[0][:, None]


def _dot(a, b, dims):
  return jax.lax.dot_general(a, b, dims, preferred_element_type=_F32)


def _forward_kernel(kv_lo_ref, kv_hi_ref, full_lo_ref, full_hi_ref,
                    q_ref, k_ref, v_ref, start_ref, limit_ref,
                    out_ref, lse_ref,
                    m_ref, l_ref, acc_ref, *, scale, num_q_blocks, num_k_blocks):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  block_k = k_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full_like(m_ref, _MASKED)
    l_ref[...] = jnp.zeros_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)

  def tile(masked):
    s_QxK = _dot(q_ref[...], k_ref[...], _NT) * scale
    if masked:
      allowed_QxK = _allowed(_column(start_ref), _column(limit_ref), j * block_k, s_QxK.shape, 1)
      s_QxK = jnp.where(allowed_QxK, s_QxK, _MASKED)
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(s_QxK, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p_QxK = jnp.exp(s_QxK - m_next[:, :1])
    if masked:  # a row with no allowed key so far has m = _MASKED and exp(0) = 1 here
      p_QxK = jnp.where(allowed_QxK, p_QxK, 0.0)
    m_ref[...] = m_next
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p_QxK, axis=1, keepdims=True)
    pv_QxE = _dot(p_QxK.astype(v_ref.dtype), v_ref[...], _NN)
    acc_ref[...] = alpha[:, :1] * acc_ref[...] + pv_QxE

  _run_tile(*_tile_status(kv_lo_ref, kv_hi_ref, full_lo_ref, full_hi_ref,
                          b * num_q_blocks + i, j), tile)

  @pl.when(j == num_k_blocks - 1)
  def _finish():
    l_Qx1 = l_ref[...][:, :1]
    seen_Qx1 = l_Qx1 > 0.0  # false only for empty ranges: their acc is 0
    out_ref[...] = (acc_ref[...] / jnp.where(seen_Qx1, l_Qx1, 1.0)).astype(out_ref.dtype)
    lse_Qx1 = jnp.where(seen_Qx1, m_ref[...][:, :1] + jnp.log(jnp.where(seen_Qx1, l_Qx1, 1.0)),
                        0.0)
    lse_ref[...] = lse_Qx1.reshape(lse_ref.shape)


def _grid_call(kernel, grid, in_specs, out_specs, out_shape, scratch, reduced_dims, interpret,
               scalars, *operands):
  parallel = len(grid) - reduced_dims
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(scalars), grid=grid, in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel",) * parallel + ("arbitrary",) * reduced_dims),
      interpret=interpret,
  )(*(x.reshape(-1) for x in scalars), *operands)


def _q_major_specs(shape_q, kv_heads, block_q, block_k, num_q):
  """Block specs of a (batch, head, q block, k block) grid: q-shaped [block_q, E] blocks,
  clamped k/v blocks of the head's kv head, and [1, block_q] row blocks (ranges, lse, delta)."""
  b, h, l, e = shape_q
  groups = h // kv_heads

  def kv_map(b_, h_, i, j, kv_lo_ref, kv_hi_ref, *_):
    row = b_ * num_q + i
    return b_, jax.lax.div(h_, groups), _clamp(j, kv_lo_ref[row], kv_hi_ref[row]), 0

  q_block = pl.BlockSpec((None, None, block_q, e), lambda b_, h_, i, j, *_: (b_, h_, i, 0))
  kv_block = pl.BlockSpec((None, None, block_k, e), kv_map)
  head_row = pl.BlockSpec((None, None, 1, block_q), lambda b_, h_, i, j, *_: (b_, h_, 0, i))
  range_row = pl.BlockSpec((None, 1, block_q), lambda b_, h_, i, j, *_: (b_, 0, i))
  return q_block, kv_block, head_row, range_row


def _forward(q, k, v, start, limit, bounds, block_q, block_k, interpret):
  b, h, l, e = q.shape
  num_q, num_k = l // block_q, l // block_k
  q_block, kv_block, head_row, range_row = _q_major_specs(q.shape, k.shape[1], block_q, block_k,
                                                          num_q)
  kernel = functools.partial(_forward_kernel, scale=e ** -0.5, num_q_blocks=num_q,
                             num_k_blocks=num_k)
  scratch = [pltpu.VMEM((block_q, _LANES), _F32), pltpu.VMEM((block_q, _LANES), _F32),
             pltpu.VMEM((block_q, e), _F32)]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, 1, l), _F32)]
  return _grid_call(kernel, (b, h, num_q, num_k),
                    [q_block, kv_block, kv_block, range_row, range_row], [q_block, head_row],
                    out_shape, scratch, 1, interpret, bounds[:4], q, k, v, start, limit)


def _dq_kernel(kv_lo_ref, kv_hi_ref, full_lo_ref, full_hi_ref,
               q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, start_ref, limit_ref,
               dq_ref, dq_acc_ref, *, scale, num_q_blocks, num_k_blocks):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  block_k = k_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    dq_acc_ref[...] = jnp.zeros_like(dq_acc_ref)

  def tile(masked):
    k_KxE = k_ref[...]
    s_QxK = _dot(q_ref[...], k_KxE, _NT) * scale
    p_QxK = jnp.exp(s_QxK - _column(lse_ref))
    if masked:
      allowed_QxK = _allowed(_column(start_ref), _column(limit_ref), j * block_k, s_QxK.shape, 1)
      p_QxK = jnp.where(allowed_QxK, p_QxK, 0.0)
    dp_QxK = _dot(do_ref[...], v_ref[...], _NT)
    ds_QxK = p_QxK * (dp_QxK - _column(delta_ref))
    dq_acc_ref[...] += _dot(ds_QxK.astype(k_KxE.dtype), k_KxE, _NN)

  _run_tile(*_tile_status(kv_lo_ref, kv_hi_ref, full_lo_ref, full_hi_ref,
                          b * num_q_blocks + i, j), tile)

  @pl.when(j == num_k_blocks - 1)
  def _finish():
    dq_ref[...] = (dq_acc_ref[...] * scale).astype(dq_ref.dtype)


def _backward_dq(q, k, v, d_out, lse, delta, start, limit, bounds, block_q, block_k, interpret):
  b, h, l, e = q.shape
  num_q, num_k = l // block_q, l // block_k
  q_block, kv_block, head_row, range_row = _q_major_specs(q.shape, k.shape[1], block_q, block_k,
                                                          num_q)
  kernel = functools.partial(_dq_kernel, scale=e ** -0.5, num_q_blocks=num_q, num_k_blocks=num_k)
  in_specs = [q_block, kv_block, kv_block, q_block, head_row, head_row, range_row, range_row]
  return _grid_call(kernel, (b, h, num_q, num_k), in_specs, q_block,
                    jax.ShapeDtypeStruct(q.shape, q.dtype), [pltpu.VMEM((block_q, e), _F32)], 1,
                    interpret, bounds[:4], q, k, v, d_out, lse, delta, start, limit)


def _dkv_kernel(q_lo_ref, q_hi_ref, kv_lo_ref, kv_hi_ref, full_lo_ref, full_hi_ref,
                q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, start_ref, limit_ref,
                dk_ref, dv_ref, dk_acc_ref, dv_acc_ref, *, scale, num_q_blocks, groups):
  del q_lo_ref, q_hi_ref  # used by the index maps only
  b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  block_k = k_ref.shape[0]

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_acc_ref[...] = jnp.zeros_like(dk_acc_ref)
    dv_acc_ref[...] = jnp.zeros_like(dv_acc_ref)

  def tile(masked):
    # Transposed scores [keys, queries]: the reductions over queries are plain matmuls, and the
    # per-query rows (lse, delta, ranges) broadcast along sublanes as they arrive.
    q_QxE, do_QxE = q_ref[...], do_ref[...]
    s_KxQ = _dot(k_ref[...], q_QxE, _NT) * scale
    p_KxQ = jnp.exp(s_KxQ - lse_ref[...])
    if masked:
      allowed_KxQ = _allowed(start_ref[...], limit_ref[...], j * block_k, s_KxQ.shape, 0)
      p_KxQ = jnp.where(allowed_KxQ, p_KxQ, 0.0)
    dv_acc_ref[...] += _dot(p_KxQ.astype(do_QxE.dtype), do_QxE, _NN)
    dp_KxQ = _dot(v_ref[...], do_QxE, _NT)
    ds_KxQ = p_KxQ * (dp_KxQ - delta_ref[...])
    dk_acc_ref[...] += _dot(ds_KxQ.astype(q_QxE.dtype), q_QxE, _NN)

  _run_tile(*_tile_status(kv_lo_ref, kv_hi_ref, full_lo_ref, full_hi_ref,
                          b * num_q_blocks + i, j), tile)

  @pl.when((g == groups - 1) & (i == num_q_blocks - 1))
  def _finish():
    dk_ref[...] = (dk_acc_ref[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _backward_dkv(q, k, v, d_out, lse, delta, start, limit, bounds, block_q, block_k, interpret):
  b, h, l, e = q.shape
  kv_heads = k.shape[1]
  groups = h // kv_heads
  num_q, num_k = l // block_q, l // block_k

  def q_index(b_, kh, j, g, i, q_lo_ref, q_hi_ref, *_):
    column = b_ * num_k + j
    return b_, kh * groups + g, _clamp(i, q_lo_ref[column], q_hi_ref[column])

  def head_row_index(*grid_and_refs):
    b_, h_, i = q_index(*grid_and_refs)
    return b_, h_, 0, i

  q_block = pl.BlockSpec((None, None, block_q, e), lambda *ix: (*q_index(*ix), 0))
  head_row = pl.BlockSpec((None, None, 1, block_q), head_row_index)
  range_row = pl.BlockSpec((None, 1, block_q), lambda *ix: (ix[0], 0, q_index(*ix)[2]))
  kv_block = pl.BlockSpec((None, None, block_k, e), lambda b_, kh, j, *_: (b_, kh, j, 0))
  kernel = functools.partial(_dkv_kernel, scale=e ** -0.5, num_q_blocks=num_q, groups=groups)
  in_specs = [q_block, kv_block, kv_block, q_block, head_row, head_row, range_row, range_row]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  scratch = [pltpu.VMEM((block_k, e), _F32), pltpu.VMEM((block_k, e), _F32)]
  scalars = (bounds.q_lo, bounds.q_hi, *bounds[:4])
  return _grid_call(kernel, (b, kv_heads, num_k, groups, num_q), in_specs, [kv_block, kv_block],
                    out_shape, scratch, 2, interpret, scalars, q, k, v, d_out, lse, delta, start,
                    limit)
