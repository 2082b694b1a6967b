"""Batches placed on the devices ahead of the step that consumes them (train.device_prefetch).

`place` (sharding.place_batch) starts host-to-device copies and returns without waiting for
them, so a batch placed while step n runs is on the devices when step n+1 starts. The wrapper
keeps the data iterator's checkpoint exact: its state is the wrapped iterator's from before the
oldest batch still buffered was pulled, i.e. the position of the next batch a step will consume,
so a checkpoint saved after step n resumes at batch n+1 whatever the depth.
"""
import collections
import copy
from typing import Callable

import grain


class DevicePrefetch(grain.DatasetIterator):
  """Yields (host batch, placed batch), keeping the next `depth` batches placed ahead.

  The host batch is the wrapped iterator's, unchanged (numpy arrays for the loop's counts, and
  the `host_keys` entries); the placed one is `place` of the batch without `host_keys`.
  Nothing is pulled before the first `__next__`, so a checkpoint can be restored into it first.
  depth=0 places each batch when it is asked for.
  """

  def __init__(self, parent: grain.DatasetIterator, place: Callable[[dict], dict], *,
               depth: int, host_keys=("skipped",)):
    super().__init__(parent)
    self._place, self._depth, self._host_keys = place, depth, tuple(host_keys)
    # (parent state before the pull, host batch, placed batch), oldest first.
    self._buffer = collections.deque()
    self._exhausted = False
    if depth < 0:
      raise ValueError(f"depth must be >= 0, got {depth}")

  def __next__(self):
    self._assert_not_closed()
    while len(self._buffer) <= self._depth and not self._exhausted:
      # Copied: a checkpoint may be written from it after the parent has moved on.
      state = copy.deepcopy(self._parent.get_state())
      try:
        host = next(self._parent)
      except StopIteration:
        self._exhausted = True
        break
      placed = self._place({k: v for k, v in host.items() if k not in self._host_keys})
      self._buffer.append((state, host, placed))
    if not self._buffer:
      raise StopIteration
    _, host, placed = self._buffer.popleft()
    return host, placed

  def get_state(self):
    if self._buffer:
      return copy.deepcopy(self._buffer[0][0])
    return self._parent.get_state()

  def set_state(self, state):
    self._buffer.clear()  # placed from the old position
    self._exhausted = False
    self._parent.set_state(state)

  def close(self):
    self._buffer.clear()  # frees the placed batches' device memory now
    super().close()
