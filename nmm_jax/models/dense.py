"""The model's dense projections, x @ w for [B, L, I] activations (the decoder's attention and
dense MLP, the ViT, the connector, the fusion layers, early fusion's patch projection; not the
LM head, which train/loss.py fuses with the loss, nor the MoE experts' grouped matmuls), with
FSDP's weight gradient reduce-scattered explicitly on TPU.

Under FSDP a weight is split along one dimension over mesh axes that also split the batch. Its
gradient is a sum over every device's tokens, and each device keeps only its slice of it: a
reduce-scatter. Left to the compiler, the gradient is produced whole and partial on each
device, and the SPMD partitioner reshards it by an all-reduce followed by a dynamic slice,
which a later pass is meant to turn into a reduce-scatter. libtpu does not when the split
dimension is minor in the gradient's layout (measured on v5p-8 for a d512 model at fsdp=4: the
attention weights' and the MLP down-projection's gradients were all-reduced, 3.1 MB per layer,
against the gate and up projections' reduce-scatters), so ZeRO-3 held whole gradients and moved
twice their bytes. Here the weight gradient is computed per device in a shard_map and reduced by
`psum_scatter` over the axes that split the weight (and `psum` over the other batch axes), so
the program says what FSDP means whatever the compiler's pattern matching finds.

Only on TPU (EXPLICIT_PLATFORMS): XLA:GPU already reduce-scatters every one of these gradients,
and there the explicit form costs memory for nothing (early-932m on h100-8 at 8 per chip: the
same collectives, temporaries 3.36 -> 4.67 GiB); XLA:CPU is what the tests run on, and they
turn it on to check its values and collectives.

Shape suffixes: B batch, L positions, I input features, O output features.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from nmm_jax import sharding

# The platforms whose compiler needs the explicit reduce-scatter (see above).
EXPLICIT_PLATFORMS = ("tpu",)


def product(x_BxLxI, w_IxO):
  """x @ w over the last axis, for [B, L, I] activations.

  Tokens are flattened to one axis, so the weight gradients contract one dimension, not two,
  which XLA:CPU runs as a plain GEMM (1.3x faster at the benchmark shape). Not when positions
  are split (mesh.sequence_parallel): the flattened tokens no longer match the [B, L] split, and
  XLA would all-reduce tensor parallelism's partial sums and slice them rather than
  reduce-scatter them (measured on h100-8: 12.2 GiB of all-reduce per step for early-932m at
  tensor=2, against 5.0 GiB plus 3.9 GiB of reduce-scatter for the 3-d product)."""
  b, l, i = x_BxLxI.shape
  if sharding.parts("activation_length", l) > 1:
    return jnp.einsum("bli,io->blo", x_BxLxI, w_IxO)
  return (x_BxLxI.reshape(b * l, i) @ w_IxO).reshape(b, l, w_IxO.shape[-1])


@dataclasses.dataclass(frozen=True)
class Reduction:
  """How a weight-shaped sum of per-device partials over the batch axes becomes the weight's
  FSDP shards: per batch axis that splits the weight, the dimension it scatters; the other batch
  axes are summed whole."""
  mesh: jax.sharding.AbstractMesh
  batch: object  # the batch dimension's PartitionSpec entry
  features: tuple  # per weight dimension, its spec entry without the batch axes
  w_spec: PartitionSpec
  scatters: tuple  # ((mesh axes, weight dimension), ...): psum_scatter, in this order
  sums: tuple  # mesh axes: psum

  def __call__(self, g):
    """Inside a shard_map: this device's partial sum -> its shard of the total."""
    for axes, dim in self.scatters:
      # Scattered along the leading dimension: libtpu lowers a reduce-scatter along a minor
      # one as an all-reduce and a slice.
      g = jnp.moveaxis(jax.lax.psum_scatter(jnp.moveaxis(g, dim, 0), axes, scatter_dimension=0,
                                            tiled=True), 0, dim)
    return jax.lax.psum(g, self.sums) if self.sums else g

  def total(self, partial, in_specs, *args):
    """The weight-shaped sum over every device of `partial(*its blocks of args)` (the blocks laid
    out by `in_specs`), in the weight's FSDP shards."""
    return jax.shard_map(lambda *blocks: self(partial(*blocks)), mesh=self.mesh,
                         in_specs=in_specs, out_specs=self.w_spec)(*args)


def reduction(batch_size: int, w_shape, w_axes) -> Reduction | None:
  """The explicit reduction in the program being traced, or None where the compiler's own is
  what FSDP wants anyway: no mesh, a platform not in EXPLICIT_PLATFORMS, no batch axis that also
  splits the weight (data parallelism all-reduces whole gradients by design), or a weight
  dimension split over batch and non-batch axes together."""
  mesh = sharding.traced_mesh()
  if mesh is None or w_axes is None or sharding.traced_platform() not in EXPLICIT_PLATFORMS:
    return None
  rules = sharding.traced_rules()
  batch = sharding.mesh_axes_of(
      sharding.logical_to_spec(("batch",), rules, mesh, shape=(batch_size,))[0])
  w_spec = sharding.logical_to_spec(w_axes, rules, mesh, shape=w_shape)
  scatters, features = [], []
  for dim, entry in enumerate(w_spec):
    axes = sharding.mesh_axes_of(entry)
    split = tuple(a for a in axes if a in batch)
    if split and len(split) != len(axes):
      return None
    if split:
      scatters.append((split, dim))
    features.append(None if split else entry)
  if not scatters:
    return None
  scattered = {a for axes, _ in scatters for a in axes}
  return Reduction(mesh=mesh, batch=batch if len(batch) > 1 else batch[0],
                   features=tuple(features), w_spec=w_spec, scatters=tuple(scatters),
                   sums=tuple(a for a in batch if a not in scattered))


def _weight_gradient(plan: Reduction, x_BxLxI, dy_BxLxO, dtype):
  def local(x_bxLxI, dy_bxLxO):
    return jnp.einsum("bli,blo->io", x_bxLxI, dy_bxLxO,
                      preferred_element_type=jnp.float32).astype(dtype)

  x_spec = PartitionSpec(plan.batch, None, plan.features[0])
  dy_spec = PartitionSpec(plan.batch, None, plan.features[1])
  return plan.total(local, (x_spec, dy_spec), x_BxLxI, dy_BxLxO)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scattered(plan, x_BxLxI, w_IxO):
  return product(x_BxLxI, w_IxO)


def _scattered_fwd(plan, x_BxLxI, w_IxO):
  return product(x_BxLxI, w_IxO), (x_BxLxI, w_IxO)


def _scattered_bwd(plan, residuals, dy_BxLxO):
  x_BxLxI, w_IxO = residuals
  _, input_vjp = jax.vjp(lambda x: product(x, w_IxO), x_BxLxI)
  (dx_BxLxI,) = input_vjp(dy_BxLxO)
  return dx_BxLxI, _weight_gradient(plan, x_BxLxI, dy_BxLxO, w_IxO.dtype)


_scattered.defvjp(_scattered_fwd, _scattered_bwd)


def dense(x_BxLxI, w_IxO, w_axes=None):
  """x @ w over the last axis ([B, L, I] @ [I, O]). `w_axes`: the weight's logical axes (as the
  2-d matrix it is here); with them, under a mesh whose batch axes split the weight (FSDP), the
  weight gradient is reduce-scattered explicitly (see the module docstring)."""
  plan = reduction(x_BxLxI.shape[0], w_IxO.shape, w_axes)
  if plan is None:
    return product(x_BxLxI, w_IxO)
  return _scattered(plan, x_BxLxI, w_IxO)
