"""Gradient accumulation (train.microbatches=K): the step runs the batch as K microbatches in a
scan and makes one update, the same update as K=1; a resumed run is bit-identical."""
import os
import shutil

import jax
import numpy as np
import optax
import pytest

from conftest import tiny_config
from nmm_jax import sharding
from nmm_jax.data import pipeline
from nmm_jax.export.run_checkpoint import flat_params, open_run
from nmm_jax.models.variables import flat_variables
from nmm_jax.train import optimizer as optimizer_lib
from nmm_jax.train import program as program_lib
from nmm_jax.train.loop import train_and_evaluate


def _one_step(config, data_dir):
  """(metrics, params before, params after: host arrays by name) of one train step on the first
  batch."""
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1, "expert": 1})
  program = program_lib.build(config, mesh, len(pipeline.source_names(config)))
  state = program.create_state(config)
  before = {k: np.asarray(v.get_value()) for k, v in flat_variables(state["params"]).items()}
  batch = next(iter(pipeline.make_dataset(config, data_dir, "train", seed=0)))
  batch.pop("skipped")
  state, metrics = program.train_step(state, sharding.place_batch(batch, program.batch_shardings))
  params = {k: np.asarray(v.get_value()) for k, v in flat_variables(state["params"]).items()}
  return jax.device_get(metrics), before, params


# Dropless top-1 MoE with the router z-loss (a mean over the whole batch's tokens, so the
# microbatches sum to it) and without the Switch load-balancing loss: that one multiplies two
# means over the tokens a layer sees, so K microbatches average K other values (as in Megatron).
MOE = {"model.moe.num_experts": 4, "model.moe.top_k": 1, "model.moe.load_balance_weight": 0.0}


@pytest.mark.parametrize("model", [{}, MOE], ids=["dense", "moe_dropless"])
def test_microbatches_make_the_same_update(model, shapes_data_dir, monkeypatch):
  """f32, on a data x fsdp mesh: loss, gradient norm, loss sums and every parameter's gradient
  equal K=1's to 1e-5 (relative; a tensor's gradient within its norm). The gradients are read
  as the update of plain SGD at rate 1: AdamW's first step divides each gradient by its own
  magnitude, which turns the last bits of a near-zero gradient into a visible difference."""
  monkeypatch.setattr(optimizer_lib, "make_optimizer", lambda t, model=None: optax.sgd(1.0))
  overrides = {"data.dir": shapes_data_dir, "mesh.data": 4, "mesh.fsdp": 2, **model}
  whole, start, whole_params = _one_step(tiny_config(**overrides), shapes_data_dir)
  parts, _, parts_params = _one_step(tiny_config(**overrides, **{"train.microbatches": 4}),
                                     shapes_data_dir)
  np.testing.assert_allclose(parts["loss"], whole["loss"], rtol=1e-5)
  np.testing.assert_allclose(parts["grad_norm"], whole["grad_norm"], rtol=1e-5)
  for key in ("nll", "count", "nll_per_source", "count_per_source"):
    np.testing.assert_allclose(parts["sums"][key], whole["sums"][key], rtol=1e-5)
  for name, value in whole_params.items():
    gradient = start[name] - value
    assert np.linalg.norm(gradient) > 0, name
    difference = np.linalg.norm(parts_params[name] - value)
    assert difference <= 1e-5 * np.linalg.norm(gradient), (name, difference)


def test_microbatched_run_resumes_bit_identically(shapes_data_dir, tmp_path):
  """K=4 for 12 steps, checkpoints at 6 and 12; with checkpoint 12 removed the same command
  resumes at 6 and recomputes steps 7..12 with the same losses and the same parameters at 12,
  bit for bit."""
  config = tiny_config(**{"data.dir": shapes_data_dir, "train.microbatches": 4,
                          "train.batch_size": 32, "train.steps": 12, "checkpoint.every_steps": 6,
                          "eval.every_steps": 100})
  workdir = str(tmp_path / "run")
  first = {r["step"]: r["loss"] for r in train_and_evaluate(config, workdir)}
  first_params = flat_params(open_run(workdir, 12).params())
  shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
  again = {r["step"]: r["loss"] for r in train_and_evaluate(config, workdir)}
  assert sorted(again) == list(range(7, 13))
  assert [again[s] for s in again] == [first[s] for s in again]
  # And the parameters it saves at 12 are the first run's, bit for bit.
  again_params = flat_params(open_run(workdir, 12).params())
  assert again_params.keys() == first_params.keys()
  for name, value in first_params.items():
    np.testing.assert_array_equal(np.asarray(again_params[name]), np.asarray(value), name)
