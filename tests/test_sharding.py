"""A sharded run equals an unsharded one, and the large parameters really are split."""
import jax
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from nmm_jax import sharding
from nmm_jax.compile import topologies
from nmm_jax.models.variables import abstract_model_state
from nmm_jax.train import optimizer, state
from nmm_jax.train.loop import train_and_evaluate

STEPS = 5


def _losses(records):
  return np.array([r["loss"] for r in records])


def test_sharded_equals_unsharded(tmp_path, shapes_data_dir):
  overrides = {"train.steps": STEPS, "data.dir": shapes_data_dir, "eval.every_steps": 100,
               "checkpoint.every_steps": 100}
  single = train_and_evaluate(
      tiny_config(**overrides, **{"mesh.data": 1}), str(tmp_path / "single"),
      devices=jax.devices()[:1])
  sharded = train_and_evaluate(
      tiny_config(**overrides, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}),
      str(tmp_path / "sharded"))
  # Sequence parallelism changes where activations live, not what is computed.
  sequence_parallel = train_and_evaluate(
      tiny_config(**overrides, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                  "mesh.sequence_parallel": True}),
      str(tmp_path / "sequence_parallel"))
  single_losses, sharded_losses = _losses(single), _losses(sharded)
  assert len(single_losses) == STEPS
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-4)
  np.testing.assert_allclose(_losses(sequence_parallel), single_losses, rtol=1e-4)
  assert single_losses[-1] < single_losses[0]  # the steps really trained


def test_large_parameters_are_split():
  config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2, expert=1))
  tx = optimizer.make_optimizer(config.train)
  _, abstract = abstract_model_state(config.model)
  shardings = state.state_shardings(abstract, tx, config.sharding_rules, mesh)
  train_state = state.create_state(config.model, tx, 0, shardings)
  params = train_state["params"]
  head = params["head_DxV"].get_value()
  # [embed -> fsdp, vocab -> tensor]: each device holds a quarter.
  assert head.sharding.shard_shape(head.shape) == (head.shape[0] // 2, head.shape[1] // 2)
  mlp = params["decoder"]["blocks"]["mlp"]["w_gate_DxF"].get_value()  # [layers, D, F]
  assert mlp.sharding.shard_shape(mlp.shape) == (mlp.shape[0], mlp.shape[1] // 2,
                                                 mlp.shape[2] // 2)
  assert len({s.device for s in mlp.addressable_shards}) == 8
  # Adam moments follow their parameter's sharding.
  mu = train_state["opt_state"][1][0].mu["head_DxV"].get_value()
  assert mu.sharding.is_equivalent_to(head.sharding, head.ndim)
  # Every parameter has logical axes for each of its dimensions.
  for path, variable in nnx.to_flat_state(abstract):
    axes = variable.get_metadata()["out_sharding"]
    assert len(axes) == variable.get_value().ndim, path


def test_mesh_orders_devices_by_the_interconnect():
  """CPU devices keep their order; a v5p slice's compile-only chips are laid out by mesh_utils
  (each axis over ICI neighbours); mesh.dcn_* asks for as many slices / hosts as it splits."""
  mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1, expert=1))
  assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]
  tpu = topologies.target("v5p-16").devices  # 8 chips, 2x2x2
  mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1, expert=1), tpu)
  coords = np.array([[d.coords for d in row.flat] for row in mesh.devices])  # [data, 4, xyz]
  assert sorted(map(tuple, coords.reshape(-1, 3))) == sorted(tuple(d.coords) for d in tpu)
  # Each fsdp group is a 2x2 plane of the torus (its collectives stay on ICI links between
  # neighbours); the data axis runs along the third dimension.
  for group in coords:
    assert sum(len(set(group[:, axis])) == 1 for axis in range(3)) == 1, coords
  with pytest.raises(ValueError, match="needs 2 processes; the devices form 1"):
    sharding.make_mesh(dict(data=2, fsdp=4, tensor=1, expert=1), dcn_shape={"data": 2})
