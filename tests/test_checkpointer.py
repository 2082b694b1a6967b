"""The Checkpointer on 8 devices: what it writes reads back, and a save compiles nothing."""
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from nmm_jax.checkpoint import Checkpointer

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class _OneStream:
  """The data iterator's checkpoint surface: one stream's JSON state."""

  def __init__(self, position: int):
    self.state = {"streams": {"0": {"position": position}}, "exhausted": []}

  def get_state(self):
    return self.state

  def set_state(self, state):
    self.state = state


def test_a_save_compiles_nothing_and_reads_back(tmp_path):
  """Orbax's replica-parallel save would slice each replicated array among its 8 replicas, a
  compiled program per slice (checkpoint.py): the first save of a small model spent seconds
  compiling them. Replicated and sharded arrays are saved without a compile, and restored."""
  mesh = jax.make_mesh((8,), ("fsdp",))
  values = {"replicated": np.arange(64 * 48, dtype=np.float32).reshape(64, 48),
            "sharded": np.arange(64 * 48, dtype=np.float32).reshape(64, 48) * -1.5}
  specs = {"replicated": P(), "sharded": P("fsdp")}
  state = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in values.items()}
  jax.block_until_ready(state)
  config = tiny_config(**{"data.streams": 1})
  checkpointer = Checkpointer(str(tmp_path), keep=2, async_save=True)
  compiles = []

  def listen(event, duration, **kwargs):
    del duration, kwargs
    if event == BACKEND_COMPILE_EVENT:
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    checkpointer.save(3, state, _OneStream(24), config)
    checkpointer.wait()
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert compiles == []

  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          state)
  iterator = _OneStream(0)
  restored = checkpointer.restore(3, abstract, iterator, config)
  checkpointer.close()
  for key, value in values.items():
    np.testing.assert_array_equal(np.asarray(restored[key]), value)
    assert restored[key].sharding == state[key].sharding
  assert iterator.state["streams"]["0"] == {"position": 24}
