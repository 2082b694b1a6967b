"""The MoE experts' grouped matmul: rows sorted by expert, each expert's rows times its weights.

Two implementations of the same product, chosen by the platform the step is lowered for:

- "ragged_dot": `jax.lax.ragged_dot`, XLA's own grouped matmul: XLA lowers it on GPU and CPU
  (and TPU), so it is the default off TPU and the reference the kernel is tested against. Rows
  past sum(group_sizes) are zeroed here, whatever the backend's lowering leaves there.
- "megablox": the Pallas TPU (Mosaic) kernel `jax.experimental.pallas.ops.tpu.megablox.gmm`,
  with its custom VJP (gmm for d lhs, tgmm for d rhs). It walks only the m tiles that hold a
  group's rows, so empty experts and the unused tail of a worst-case-sized receive buffer (expert
  parallelism) cost no MXU work. It needs tile-aligned shapes; `grouped_matmul` pads to them
  (`megablox_tiling`).
"""
import jax
import jax.numpy as jnp

GROUPED_MATMULS = ("ragged_dot", "megablox")

# Mosaic tiles are (8, 128) for f32, (16, 128) for bf16: every megablox tile here is a multiple
# of 128 on all three dims, which is aligned for both.
LANE = 128
# The largest tile per dim. At 512 x 512 x 512 the kernels' VMEM (double-buffered lhs, rhs and
# output blocks plus the f32 accumulator; the backward's cotangent is f32) is about 7 MiB, inside
# the default scoped VMEM (forward and backward compile for v5e, v5p and v6e with f32
# operands); a bigger m tile also wastes more rows at each group boundary (a group's first and
# last tiles are computed whole, then masked).
MAX_TILE = 512


def default_grouped_matmul(platform: str) -> str:
  """The implementation for a lowering platform ("tpu", "cuda", "rocm", "cpu")."""
  return "megablox" if platform == "tpu" else "ragged_dot"


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _tile(padded: int) -> int:
  """The largest multiple of LANE, at most MAX_TILE, that divides `padded` (a LANE multiple)."""
  return next(t for t in range(MAX_TILE, 0, -LANE) if padded % t == 0)


def megablox_tiling(r: int, d: int, f: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
  """((R, D, F) padded, (tm, tk, tn)) for megablox: each dim rounded up to a multiple of 128,
  and its tile the largest multiple of 128, at most 512, that divides it (2048 -> 512,
  768 -> 384, 1408 = 11 x 128 -> 128, 100 -> padded to 128, one tile)."""
  padded = tuple(_round_up(max(n, 1), LANE) for n in (r, d, f))
  return padded, tuple(_tile(n) for n in padded)


def _megablox(lhs_RxD, rhs_XxDxF, group_sizes_X, interpret):
  # Imported here: the Pallas TPU modules are needed only where this path is taken.
  from jax.experimental.pallas.ops.tpu.megablox import gmm

  r, d = lhs_RxD.shape
  f = rhs_XxDxF.shape[2]
  (r_pad, d_pad, f_pad), tiling = megablox_tiling(r, d, f)
  total = jnp.sum(group_sizes_X)
  # The kernel never visits rows past the last group: their output (and, in the backward, the
  # lhs gradient, gmm of the cotangent) is uninitialised memory, NaN in interpret mode. Zeroing
  # the lhs rows there makes where's VJP drop that gradient, and keeps NaNs or garbage in the
  # unused tail of a receive buffer out of tgmm's rhs gradient.
  valid_R = jnp.arange(r) < total
  lhs_RxD = jnp.where(valid_R[:, None], lhs_RxD, jnp.zeros((), lhs_RxD.dtype))
  # Zero padding: extra D is a zero term of the contraction, extra R rows lie past every group
  # (never visited), extra F columns are sliced off.
  lhs_pad = jnp.pad(lhs_RxD, ((0, r_pad - r), (0, d_pad - d)))
  rhs_pad = jnp.pad(rhs_XxDxF, ((0, 0), (0, d_pad - d), (0, f_pad - f)))
  out_pad = gmm(lhs_pad, rhs_pad, group_sizes_X, jnp.float32, tiling, None, None, False,
                interpret)
  out_RxF = out_pad[:r, :f]
  return jnp.where(valid_R[:, None], out_RxF, 0.0)


def grouped_matmul(lhs_RxD: jax.Array, rhs_XxDxF: jax.Array, group_sizes_X: jax.Array, *,
                   implementation: str, interpret: bool = False) -> jax.Array:
  """[R, F] in lhs's dtype: rows [offset_g, offset_g + group_sizes_X[g]) of lhs (groups
  consecutive, in order, from row 0) times rhs_XxDxF[g], accumulated in f32; rows past
  sum(group_sizes_X) are zero, and get zero gradient. sum(group_sizes_X) must be at most R.

  implementation: "ragged_dot" (any platform) or "megablox" (TPU; elsewhere only interpreted:
  interpret=True runs Pallas' HLO interpreter, a `pltpu.InterpretParams()` simulates the TPU's
  memories, as the tests do). megablox takes bf16 or f32 operands only (the kernel's check) and
  int32 group sizes (cast here). Its dims that are not multiples of 128 are zero-padded up to
  them (R and D on lhs, D and F on rhs): always correct, at the cost of a padded copy; model
  dims are normally 128-aligned and R (tokens x top-k) a multiple of 128, leaving one
  elementwise pass that zeroes the lhs rows past the groups. `megablox_tiling` gives the padded
  dims and the tiles.
  """
  if implementation not in GROUPED_MATMULS:
    raise ValueError(f"grouped matmul {implementation!r}: expected one of {GROUPED_MATMULS}")
  if lhs_RxD.ndim != 2 or rhs_XxDxF.ndim != 3 or group_sizes_X.ndim != 1:
    raise ValueError(f"expected lhs [R, D], rhs [X, D, F], group sizes [X]; got "
                     f"{lhs_RxD.shape}, {rhs_XxDxF.shape}, {group_sizes_X.shape}")
  if (lhs_RxD.shape[1] != rhs_XxDxF.shape[1] or rhs_XxDxF.shape[0] != group_sizes_X.shape[0]):
    raise ValueError(f"lhs {lhs_RxD.shape}, rhs {rhs_XxDxF.shape} and group sizes "
                     f"{group_sizes_X.shape} disagree on D or X")
  group_sizes_X = group_sizes_X.astype(jnp.int32)
  if implementation == "ragged_dot":
    out_RxF = jax.lax.ragged_dot(lhs_RxD, rhs_XxDxF, group_sizes_X,
                                 preferred_element_type=jnp.float32)
    # XLA:CPU leaves rows outside every group at zero; the contract does not rest on each
    # backend's lowering doing the same.
    valid_R = jnp.arange(lhs_RxD.shape[0]) < jnp.sum(group_sizes_X)
    out_RxF = jnp.where(valid_R[:, None], out_RxF, 0.0)
  else:
    out_RxF = _megablox(lhs_RxD, rhs_XxDxF, group_sizes_X, interpret)
  return out_RxF.astype(lhs_RxD.dtype)
