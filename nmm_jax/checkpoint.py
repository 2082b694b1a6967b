"""A thin wrapper over Orbax's CheckpointManager: train state + data-iterator state + config.

Orbax writes each step into a temporary folder and commits it by rename, so a crash mid-save
leaves the previous checkpoint usable. Every process calls save and restore: the state is
written and read as shards of the global arrays (restored into whatever shardings the caller
asks for: another mesh works), the data state as one file per data stream (data/streams.py).

Damage after the commit (a truncated or deleted file: a full disk, a half-synced filesystem)
costs one checkpoint interval: `restore_newest_readable` moves an unreadable step aside to
`checkpoints/unreadable-<step>/` (kept, never deleted) and restores the step before it; every
process agrees on each step's verdict. A failed save raises CheckpointSaveError naming the step
and the reason; the steps committed before it stay as they were.
"""

import functools

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import type_handler_registry

from nmm_jax import storage
from nmm_jax.data import streams

UNREADABLE_PREFIX = "unreadable-"
SUPERSEDED_PREFIX = "superseded-"  # steps after an explicit checkpoint.restore_step


class CheckpointSaveError(RuntimeError):
  """A save that did not commit (disk full, permissions, ...); earlier steps are untouched."""


class UnreadableCheckpoint(RuntimeError):
  """The checkpoint asked for (checkpoint.restore_step) cannot be read."""


def one_line(error: BaseException) -> str:
  """'ErrorType: the first line of its message' of the innermost error of the chain: Orbax
  wraps the TensorStore or OS error that says what is wrong (OUT_OF_RANGE reading a file, no
  space left), and both run long."""
  seen = {id(error)}
  while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
    error = inner
    seen.add(id(error))
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _all_processes(ok: bool) -> bool:
  """True when `ok` holds on every process (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


# Orbax's "replica-parallel" save splits each replicated array among its replicas, so that
# several hosts write parts of it. The split is a slicing op per array and shard, each compiled
# on first use: the first save of a small model spent 2.4 s compiling them (CPU, 8 devices). A
# split smaller than this is not worth a program; large replicated arrays still get it.
REPLICA_PARALLEL_MIN_BYTES = 16 * 2 ** 20


@functools.cache
def _use_replica_parallel_for_large_arrays_only():
  """Once per process, in place of Orbax's default jax.Array handler, quietly. (The store and
  the registry are not exported; Orbax builds its default registry from the same two.)"""
  handler = ocp.type_handlers.ArrayHandler(
      array_metadata_store=array_metadata_store.Store(),  # as in Orbax's default handler
      min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)
  type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, handler, override=True,
                                                          ignore_warnings=True)


class Checkpointer:
  """Saves when asked: the caller owns the policy (every N steps, last step, on SIGTERM)."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool):
    _use_replica_parallel_for_large_arrays_only()
    self.directory = storage.path(workdir) / "checkpoints"
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             enable_async_checkpointing=async_save),
    )
    self._pending = None  # the step of a save still being written (async)

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self) -> list:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iterator, config):
    """Starts the save of `step` (async: written while training goes on). A failure of this or
    the previous save raises CheckpointSaveError."""
    self._finish_pending()
    try:
      self.manager.save(step, force=True, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=streams.StreamsSave(data_iterator, streams.num_streams(config)),
          config=ocp.args.JsonSave(config.to_dict()),
      ))
    except Exception as e:  # noqa: BLE001 - whatever the filesystem raised, said in one line
      raise self._save_error(step, e) from e
    self._pending = step

  def _finish_pending(self):
    """Waits for the save in flight and checks it committed and reads back its metadata."""
    step, self._pending = self._pending, None
    if step is None:
      return
    try:
      self.manager.wait_until_finished()
      self.manager.reload()
      if step not in self.manager.all_steps():
        raise OSError(f"step {step} was not committed to {self.directory}")
      self.manager.item_metadata(step)
    except Exception as e:  # noqa: BLE001
      raise self._save_error(step, e) from e

  def _save_error(self, step, error):
    kept = [s for s in self.manager.all_steps() if s != step]
    return CheckpointSaveError(
        f"checkpoint save at step {step} into {self.directory} failed ({one_line(error)}); "
        + (f"the checkpoint at step {max(kept)} is intact" if kept else "no earlier checkpoint")
        + ". Free space or fix the target's permissions and run the same command again.")

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

  def restore_newest_readable(self, abstract_state, data_iterator, config, check_saved=None):
    """(step, state, steps moved aside): the newest checkpoint that reads back, or (0, None,
    ...) when none does. `check_saved(saved config dict)` may refuse a checkpoint (ConfigError:
    passed on, not a damage). With config.checkpoint.restore_step = N only step N is tried, and
    UnreadableCheckpoint is raised if it cannot be read; the steps after it are moved to
    checkpoints/superseded-<step>/ (the run rewrites those steps)."""
    requested = config.checkpoint.restore_step
    steps = sorted(self.manager.all_steps(), reverse=True)
    if requested:
      if requested not in steps:
        from nmm_jax.config import ConfigError
        raise ConfigError(f"config.checkpoint.restore_step: {self.directory} has no checkpoint "
                          f"at step {requested}; it has {sorted(steps) or 'none'}")
      steps = [requested]
    moved = []
    for step in steps:
      error = None
      try:
        saved = self.saved_config(step)
      except Exception as e:  # noqa: BLE001 - any failure to read is a damaged checkpoint
        error = e
      if error is None and check_saved is not None:
        check_saved(saved)
      state = None
      if error is None:
        try:
          state = self.restore(step, abstract_state, data_iterator, config)
        except Exception as e:  # noqa: BLE001
          error = e
      if _all_processes(error is None):
        if requested:  # the run continues from here: later steps are kept, out of its way
          for later in (s for s in self.manager.all_steps() if s > step):
            logging.warning("checkpoint.restore_step=%d: the later checkpoint at step %d is "
                            "moved to %s", step, later, self.move_aside(later, SUPERSEDED_PREFIX))
        return step, state, moved
      reason = one_line(error) if error else "unreadable on another process"
      if requested:
        raise UnreadableCheckpoint(f"checkpoint at step {step} in {self.directory} is "
                                   f"unreadable: {reason}")
      aside = self.move_aside(step)
      logging.error("Checkpoint at step %d is unreadable (%s); moved to %s, trying the one "
                    "before it", step, reason, aside)
      moved.append(step)
    return 0, None, moved

  def move_aside(self, step: int, prefix: str = UNREADABLE_PREFIX) -> epath.Path:
    """checkpoints/<step> -> checkpoints/<prefix><step> (process 0 moves, all wait)."""
    aside = self.directory / f"{prefix}{step}"
    if jax.process_index() == 0:
      source = self.directory / str(step)
      n = 1
      while aside.exists():  # an earlier fallback kept one of that step already
        aside, n = self.directory / f"{prefix}{step}.{n}", n + 1
      source.rename(aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"checkpoint moved aside {step}")
    self.manager.reload()
    return aside

  def wait(self):
    self._finish_pending()

  def close(self):
    try:
      self._finish_pending()
    finally:
      self.manager.close()
