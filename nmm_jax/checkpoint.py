"""A thin wrapper over Orbax's CheckpointManager: train state + data-iterator state + config.

Orbax writes each step into a temporary folder and commits it by rename, so a crash mid-save
leaves the previous checkpoint usable. Every process calls save and restore: the state is
written and read as shards of the global arrays (restored into whatever shardings the caller
asks for: another mesh works), the data state as one file per data stream (data/streams.py).
"""
import os

import orbax.checkpoint as ocp

from nmm_jax.data import streams


class Checkpointer:
  """Saves when asked: the caller owns the policy (every N steps, last step, on SIGTERM)."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool):
    self.manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             enable_async_checkpointing=async_save),
    )

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, config):
    self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=streams.StreamsSave(data_iterator, streams.num_streams(config)),
        config=ocp.args.JsonSave(config.to_dict()),
    ))

  def saved_config(self, step: int) -> dict:
    """The config saved with the checkpoint at `step`, as a dict."""
    return self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore())).config

  def restore(self, step: int, abstract_state, data_iterator, config):
    """Restores the state into the shardings of `abstract_state` and the iterator in place."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=streams.StreamsRestore(data_iterator, streams.num_streams(config),
                                    streams.local_streams(config)),
    ))
    return restored.state

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
