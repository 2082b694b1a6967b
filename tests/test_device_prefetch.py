"""train.device_prefetch: batches placed ahead never change what a step sees, and a checkpoint
saves the position of the next batch a step consumes, not of the ones already placed."""
import os
import shutil

import grain
import jax
import numpy as np
import pytest

from conftest import tiny_config
from nmm_jax import config as config_lib
from nmm_jax.train.device_prefetch import DevicePrefetch
from nmm_jax.train.loop import train_and_evaluate

STEPS = 8  # checkpoints at 4 and 8 (checkpoint.every_steps below); one eval, at the end


def _batches(n=10):
  """A real Grain iterator of dict batches: "x" = [i], "skipped" = {"empty": i}."""
  ds = grain.MapDataset.range(n).map(lambda i: {"x": np.array([i]), "skipped": {"empty": i}})
  return iter(ds.to_iter_dataset())


class _Place:
  """jax.device_put, recording each batch's keys."""

  def __init__(self):
    self.keys = []

  def __call__(self, batch):
    self.keys.append(sorted(batch))
    return jax.device_put(batch)


def _values(iterator, count):
  out = []
  for _ in range(count):
    host, placed = next(iterator)
    assert host["x"][0] == int(placed["x"][0]) == host["skipped"]["empty"]
    out.append(int(host["x"][0]))
  return out


def test_in_order_lazy_and_host_keys_stay_on_the_host():
  place = _Place()
  iterator = DevicePrefetch(_batches(), place, depth=2)
  assert place.keys == []  # nothing pulled before the first batch is asked for (restore first)
  assert _values(iterator, 1) == [0]
  assert len(place.keys) == 3  # that one and two ahead
  assert place.keys[0] == ["x"]  # "skipped" is not placed
  assert _values(iterator, 9) == list(range(1, 10))
  with pytest.raises(StopIteration):
    next(iterator)
  with pytest.raises(StopIteration):
    next(iterator)
  iterator.close()


@pytest.mark.parametrize("consumed", [0, 1, 4, 8, 10])
def test_state_is_the_next_batch_a_caller_gets(consumed):
  iterator = DevicePrefetch(_batches(), _Place(), depth=2)
  _values(iterator, consumed)
  state = iterator.get_state()
  fresh = DevicePrefetch(_batches(), _Place(), depth=2)  # a restarted process
  fresh.set_state(state)
  assert _values(fresh, 10 - consumed) == list(range(consumed, 10))


def test_set_state_mid_stream_drops_the_buffer():
  iterator = DevicePrefetch(_batches(), _Place(), depth=2)
  _values(iterator, 2)
  state = iterator.get_state()
  assert _values(iterator, 4) == [2, 3, 4, 5]
  iterator.set_state(state)
  assert _values(iterator, 3) == [2, 3, 4]


def test_depth_zero_passes_through():
  parent, place = _batches(), _Place()
  iterator = DevicePrefetch(parent, place, depth=0)
  assert _values(iterator, 3) == [0, 1, 2]
  assert len(place.keys) == 3  # nothing ahead
  assert iterator.get_state() == parent.get_state() == {"next_index": 3}


def test_config_key_checked_and_free_to_change_on_resume():
  with pytest.raises(config_lib.ConfigError, match=r"train\.device_prefetch"):
    config_lib.validate(tiny_config(**{"train.device_prefetch": -1}), num_devices=8)
  saved = tiny_config(**{"train.device_prefetch": 0}).to_dict()
  config_lib.check_resumable(saved, tiny_config(**{"train.device_prefetch": 3}))


def _run(workdir, data_dir, depth):
  config = tiny_config(**{"train.steps": STEPS, "checkpoint.every_steps": STEPS // 2,
                          "data.dir": data_dir, "train.device_prefetch": depth})
  return {r["step"]: r for r in train_and_evaluate(config, str(workdir))}


def test_training_is_the_same_at_any_depth_and_resumes_exactly(tmp_path, shapes_data_dir):
  none = _run(tmp_path / "none", shapes_data_dir, 0)
  ahead = _run(tmp_path / "ahead", shapes_data_dir, 2)
  assert sorted(ahead) == list(range(1, STEPS + 1))
  for step, record in ahead.items():
    assert (record["loss"], record["grad_norm"]) == (none[step]["loss"], none[step]["grad_norm"])
  # Resume the depth-2 run from its step-4 checkpoint (saved with two batches placed ahead) at
  # depth 1: steps 5.. must see batches 5.., so their losses are the uninterrupted run's.
  resumed_dir = tmp_path / "resumed"
  shutil.copytree(tmp_path / "ahead", resumed_dir)
  shutil.rmtree(os.path.join(resumed_dir, "checkpoints", str(STEPS)))
  resumed = _run(resumed_dir, shapes_data_dir, 1)
  assert sorted(resumed) == list(range(STEPS // 2 + 1, STEPS + 1))
  for step, record in resumed.items():
    assert (record["loss"], record["grad_norm"]) == (none[step]["loss"], none[step]["grad_norm"])
  assert resumed[STEPS]["eval/loss"] == ahead[STEPS]["eval/loss"] == none[STEPS]["eval/loss"]
