"""Grain stages that keep bad input from stopping training, and count what they drop.

* `ShardedRecords`: a random-access source over ArrayRecord shards, opened one by one; a shard
  that cannot be opened is left out and counted, a record that cannot be read comes back as a
  `RecordError` instead of raising.
* `Unpack`: flattens each document's pieces into single elements and drops skip markers,
  counting them by reason; its checkpointed state includes the counts.
* `attach_skip_counts`: the map that adds `skipped` (reason -> count since the start of
  training, restored on resume with `Unpack`'s state) to each batch.
* `SkipTally`: each stream and worker process counts its own slice of the data; this map, in
  the main process, turns their counts into the sum.
"""
import bisect
import collections
import dataclasses

import grain
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

LOGGED_SKIPS = 5  # per process: the first few skipped documents are logged with shard and index
# Every reason a document can be skipped for (where it is raised: stages, pipeline, features).
SKIP_REASONS = ("unreadable_shard", "read_error", "unparsable", "bad_image", "empty", "too_long")


@dataclasses.dataclass(frozen=True)
class RecordError:
  reason: str
  detail: str


@dataclasses.dataclass(frozen=True)
class Skip:
  """Marker for a document that was dropped: why, and where it came from."""
  reason: str
  where: str
  detail: str


class ShardedRecords:
  """Records of several ArrayRecord shards as one sequence of (where, raw bytes | RecordError)."""

  def __init__(self, paths: list[str]):
    self.paths, self._sources, self.unreadable, self._offsets = [], [], [], [0]
    for path in paths:
      try:
        source = grain.sources.ArrayRecordDataSource([path])
        length = len(source)
      except Exception as e:  # array_record raises RuntimeError with the reason
        logging.warning("data: leaving out unreadable shard %s (%s)", path, e)
        self.unreadable.append(path)
        continue
      self.paths.append(path)
      self._sources.append(source)
      self._offsets.append(self._offsets[-1] + length)

  def __len__(self):
    return self._offsets[-1]

  def __getitem__(self, index: int):
    shard = bisect.bisect_right(self._offsets, index) - 1
    local = index - self._offsets[shard]
    where = f"{self.paths[shard]}[{local}]"
    try:
      return where, self._sources[shard][local]
    except Exception as e:
      return where, RecordError("read_error", f"{type(e).__name__}: {e}")

  def __getstate__(self):
    # Sources hold open files: reopen in worker processes.
    return {"paths": self.paths + self.unreadable}

  def __setstate__(self, state):
    self.__init__(state["paths"])


class SkipCounter:
  """Counts by reason, shared by `Unpack` (which counts) and `attach_skip_counts` (which reports).
  Pickled with the pipeline into a worker process, both still share one counter there."""

  def __init__(self, initial: dict[str, int] | None = None):
    self.counts = collections.Counter(initial or {})
    self.logged = 0


class _UnpackIterator(grain.DatasetIterator):
  def __init__(self, parent, counter: SkipCounter):
    super().__init__(parent)
    self._counter = counter
    self._buffer, self._next = [], 0
    self._parent_state = self._parent.get_state()

  def __next__(self):
    while self._next >= len(self._buffer):
      self._parent_state = self._parent.get_state()
      element = next(self._parent)
      if isinstance(element, Skip):
        self._counter.counts[element.reason] += 1
        if self._counter.logged < LOGGED_SKIPS:
          self._counter.logged += 1
          logging.warning("data: skipped %s (%s): %s", element.where, element.reason,
                          element.detail)
        continue
      self._buffer, self._next = element, 0
    self._next += 1
    return self._buffer[self._next - 1]

  def get_state(self):
    return {"parent": self._parent_state, "next": self._next,
            "skipped": dict(self._counter.counts)}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._parent_state = state["parent"]
    self._counter.counts = collections.Counter(state["skipped"])
    self._buffer, self._next = [], 0
    if state["next"] > 0:
      # Refill the buffer with the same document (the stages above are deterministic).
      self._buffer, self._next = next(self._parent), state["next"]


class Unpack(grain.IterDataset):
  """list-of-pieces | Skip  ->  piece, piece, ...  (skips counted, the first few logged)."""

  def __init__(self, parent, counter: SkipCounter):
    super().__init__(parent)
    self.counter = counter

  def __iter__(self):
    return _UnpackIterator(self._parent.__iter__(), self.counter)


# Index of the Grain worker process this pipeline copy runs in (0 without workers).
_worker_index = 0


def set_worker_index(worker_index: int, worker_count: int):
  """Grain's `worker_init_fn`: runs first in each worker process."""
  del worker_count
  global _worker_index
  _worker_index = worker_index


def attach_skip_counts(batch, counter: SkipCounter, stream: int = 0):
  """Adds `skipped` = ((stream, worker index), {reason: count so far}) to a batch: a plain map,
  so the counts restored with `Unpack`'s state are what the next batch reports."""
  return {**batch, "skipped": ((stream, _worker_index), dict(counter.counts))}


def sum_over_processes(counts: dict) -> dict:
  """{reason: count} summed over all processes (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return dict(counts)
  unknown = set(counts) - set(SKIP_REASONS)
  assert not unknown, f"skip reasons {unknown} missing from SKIP_REASONS"
  local = np.array([counts.get(r, 0) for r in SKIP_REASONS], np.int64)
  total = multihost_utils.process_allgather(local).sum(axis=0)
  return {r: int(n) for r, n in zip(SKIP_REASONS, total) if n}


class SkipTally:
  """Map in the main process: `skipped` (a list of ((stream, worker), counts), one per stream
  in the batch) -> {reason: sum}, from the latest counts of every stream and worker. After a
  resume a worker's first batch brings back its restored counts, so the sum is complete again
  once every worker has delivered a batch."""

  def __init__(self):
    self._latest = {}

  def __call__(self, batch):
    for source, counts in batch["skipped"]:
      self._latest[tuple(source)] = counts
    total = collections.Counter()
    for c in self._latest.values():
      total.update(c)
    return {**batch, "skipped": dict(total)}
