"""The mesh vocabulary (axis names, the default logical-axis rules, the batch axes), mesh from
config, logical-axis rules -> PartitionSpecs, and shardings for params and batches."""
import contextlib
import contextvars
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
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
)

# The rules of the program being traced (traced_under sets them): layers that lay out their own
# computation, such as the MoE layer's shard_map, read them at trace time.
_TRACED_RULES = contextvars.ContextVar("traced_rules", default=DEFAULT_SHARDING_RULES)


def _first_match(rules, logical: str):
  for name, physical in rules:
    if name == logical:
      return physical
  return None


def batch_axes(rules) -> tuple[str, ...]:
  """The mesh axes the batch (and every per-token activation) is split over: the rules' "batch"
  entry, in order."""
  physical = _first_match(rules, "batch")
  if physical is None:
    return ()
  return (physical,) if isinstance(physical, str) else tuple(physical)


def batch_shards(rules, mesh_shape: dict) -> int:
  """How many parts the batch is split into on a mesh of these axis sizes."""
  return math.prod(mesh_shape[a] for a in batch_axes(rules))


def traced_rules():
  """The logical-axis rules of the program being traced (the default rules outside one)."""
  return _TRACED_RULES.get()


def make_mesh(mesh_shape: dict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = tuple(mesh_shape[a] for a in MESH_AXES)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], rules, mesh: Mesh) -> PartitionSpec:
  """Maps each logical axis name to mesh axes by the first matching rule.

  Mesh axes of size 1 are dropped (they shard nothing), and a mesh axis already used by an
  earlier dimension of the same array is not used again (a spec may name each axis once).
  """
  rule_table = {}
  for logical, physical in rules:
    rule_table.setdefault(logical, physical)
  used = set()
  spec = []
  for logical in logical_axes:
    physical = rule_table.get(logical) if logical is not None else None
    if physical is None:
      spec.append(None)
      continue
    physical = (physical,) if isinstance(physical, str) else tuple(physical)
    kept = tuple(a for a in physical if mesh.shape[a] > 1 and a not in used)
    used.update(kept)
    spec.append(kept if len(kept) > 1 else (kept[0] if kept else None))
  return PartitionSpec(*spec)


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
    try:
      with jax.set_mesh(self.mesh):
        yield
    finally:
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
