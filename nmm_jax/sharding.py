"""The mesh vocabulary (axis names, the default logical-axis rules, the batch axes), mesh from
config, logical-axis rules -> PartitionSpecs, and shardings for params and batches."""
import contextlib
import contextvars
import math
from typing import Sequence

import jax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Logical axis -> mesh axes (MaxText style). The first matching rule wins; a mesh axis already
# used by an earlier dimension of the same array is skipped.
DEFAULT_SHARDING_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("exp", "expert"),
    ("layers", None),
    ("length", None),
    # Activations (models/ constrains them with `constrain`): tokens over the batch axes above,
    # the residual stream's width whole, attention heads and MLP / vocabulary columns over
    # tensor (Megatron). The residual stream's positions (activation_length) are split over
    # tensor with mesh.sequence_parallel (a rule put before these); attention's queries and keys
    # (activation_q_length, activation_kv_length) stay whole there, split by heads instead.
    ("activation_length", None),
    ("activation_q_length", None),
    ("activation_kv_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)

# The rules of the program being traced (traced_under sets them): layers that lay out their own
# computation, such as the MoE layer's shard_map, read them at trace time.
_TRACED_RULES = contextvars.ContextVar("traced_rules", default=DEFAULT_SHARDING_RULES)
# The platform of the devices the program being traced is for ("tpu", "gpu", "cpu"; None outside
# traced_under): where a layout choice depends on what a backend's compiler does with it.
_TRACED_PLATFORM = contextvars.ContextVar("traced_platform", default=None)


# mesh.sequence_parallel: Megatron's sequence parallelism. The norms and the residual stream
# between the blocks are split along positions over tensor, so tensor parallelism's all-reduce
# after attention and after the MLP becomes a reduce-scatter, and an all-gather before them.
SEQUENCE_PARALLEL_RULES = (("activation_length", "tensor"),)


def _first_match(rules, logical: str):
  for name, physical in rules:
    if name == logical:
      return physical
  return None


def mesh_axes_of(physical) -> tuple[str, ...]:
  """A rule's right-hand side (None, one mesh axis, or several) as a tuple of mesh axes."""
  if physical is None:
    return ()
  return (physical,) if isinstance(physical, str) else tuple(physical)


def batch_axes(rules) -> tuple[str, ...]:
  """The mesh axes the batch (and every per-token activation) is split over: the rules' "batch"
  entry, in order."""
  return mesh_axes_of(_first_match(rules, "batch"))


def batch_shards(rules, mesh_shape: dict) -> int:
  """How many parts the batch is split into on a mesh of these axis sizes."""
  return math.prod(mesh_shape[a] for a in batch_axes(rules))


def traced_rules():
  """The logical-axis rules of the program being traced (the default rules outside one)."""
  return _TRACED_RULES.get()


def traced_platform():
  """The platform of the mesh the program being traced runs on (None outside traced_under)."""
  return _TRACED_PLATFORM.get()


def make_mesh(mesh_shape: dict, devices=None, dcn_shape: dict | None = None) -> Mesh:
  """The device mesh of these axis sizes. Devices are placed by the chips' interconnect
  (mesh_utils maps the mesh axes onto a TPU slice's physical torus axes). `dcn_shape`
  ({axis: parts}, mesh.dcn_*) splits axes across TPU slices or GPU hosts, which talk over the
  slower data-centre network: a hybrid mesh whose DCN part is outermost, so only those axes'
  collectives cross it. ValueError when the devices do not form that many granules."""
  devices = jax.devices() if devices is None else list(devices)
  shape = tuple(mesh_shape[a] for a in MESH_AXES)
  dcn = tuple((dcn_shape or {}).get(a, 1) for a in MESH_AXES)
  if math.prod(dcn) == 1:
    array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  else:
    # Granules: TPU slices, else processes (one per GPU host). CPU and GPU devices carry a
    # slice_index too (0 for all of them), so the platform decides.
    by_process = devices[0].platform != "tpu" or not hasattr(devices[0], "slice_index")
    key = "process_index" if by_process else "slice_index"
    granules = len({getattr(d, key) for d in devices})
    if granules != math.prod(dcn):
      raise ValueError(f"mesh.dcn_* = {dict(zip(MESH_AXES, dcn))} needs {math.prod(dcn)} "
                       f"{'processes' if by_process else 'TPU slices'}; the devices form "
                       f"{granules}")
    ici = tuple(s // d for s, d in zip(shape, dcn))
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process,
                                                 allow_split_physical_axes=True)
  return Mesh(array, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], rules, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """Maps each logical axis name to mesh axes by the first matching rule.

  Mesh axes of size 1 are dropped (they shard nothing), and a mesh axis already used by an
  earlier dimension of the same array is not used again (a spec may name each axis once). With
  `shape`, a dimension keeps only the leading mesh axes whose sizes divide it (a batch of one
  sequence for decoding stays whole).
  """
  used = set()
  spec = []
  for logical in logical_axes:
    physical = _first_match(rules, logical) if logical is not None else None
    if physical is None:
      spec.append(None)
      continue
    kept = tuple(a for a in mesh_axes_of(physical) if mesh.shape[a] > 1 and a not in used)
    if shape is not None:
      size = shape[len(spec)]
      divides = [math.prod(mesh.shape[a] for a in kept[:i + 1]) for i in range(len(kept))]
      kept = tuple(a for a, parts in zip(kept, divides) if size % parts == 0)
    used.update(kept)
    spec.append(kept if len(kept) > 1 else (kept[0] if kept else None))
  return PartitionSpec(*spec)


def traced_mesh():
  """The context mesh of the program being traced when it has this project's axes (the one
  traced_under sets), else None: a model called eagerly, or jitted without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names) else mesh


def parts(logical: str, size: int) -> int:
  """How many pieces a dimension of `size` along the logical axis `logical` is split into in the
  program being traced (1 outside a mesh): what a computation that keeps per-device partial
  results apart (the loss's head gradient) needs to know."""
  mesh = traced_mesh()
  if mesh is None:
    return 1
  spec = logical_to_spec((logical,), traced_rules(), mesh, shape=(size,))
  return math.prod(mesh.shape[a] for a in mesh_axes_of(spec[0]))


def constrain(x, logical_axes: Sequence[str | None]):
  """`x` laid out by its logical axes under the traced rules and the context mesh (a no-op
  outside one, e.g. a model called eagerly or jitted without a mesh). Without these, GSPMD
  would let a weight's sharding leak into the activations: the embedding table's `embed ->
  fsdp` split carried through the layer scan as [whole batch, L, D/fsdp]."""
  mesh = traced_mesh()
  if mesh is None:
    return x
  spec = logical_to_spec(logical_axes, traced_rules(), mesh, shape=x.shape)
  return jax.lax.with_sharding_constraint(x, spec)


def param_shardings(abstract_params: nnx.State, rules, mesh: Mesh):
  """NamedSharding per parameter, from the logical axes each nnx.Param carries."""
  def sharding_of(variable):
    axes = variable.get_metadata().get("out_sharding") or (None,) * len(variable.get_value().shape)
    return variable.replace(NamedSharding(mesh, logical_to_spec(axes, rules, mesh)))
  return jax.tree.map(sharding_of, abstract_params,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
  """Batch arrays shard their leading axis over the batch axes; the rest is replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))


def batch_shardings(ndims: dict, mesh: Mesh, rules) -> dict:
  """{key: batch sharding} for a batch whose arrays have these ranks."""
  return {key: batch_sharding(mesh, rules, ndim) for key, ndim in ndims.items()}


class traced_under:
  """`jitted`, called (or lowered) with `mesh` as the context mesh and `rules` as the traced
  rules, which is what the MoE layers' shard_map runs over. Only around the step: nnx.eval_shape
  under a context mesh would read the params' logical axis names as mesh axes."""

  def __init__(self, mesh: Mesh, jitted, rules=DEFAULT_SHARDING_RULES):
    self.mesh, self.jitted, self.rules = mesh, jitted, rules

  @contextlib.contextmanager
  def _context(self):
    token = _TRACED_RULES.set(tuple(self.rules))
    platform = _TRACED_PLATFORM.set(self.mesh.devices.flat[0].platform)
    try:
      with jax.set_mesh(self.mesh):
        yield
    finally:
      _TRACED_PLATFORM.reset(platform)
      _TRACED_RULES.reset(token)

  def __call__(self, *args):
    with self._context():
      return self.jitted(*args)

  def lower(self, *args):
    with self._context():
      return self.jitted.lower(*args)


def place_batch(batch: dict, shardings: dict) -> dict:
  """Process-local numpy batch -> global jax arrays in their batch shardings."""
  return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
