"""Data streams: the global batch as a fixed number of independent pipelines, whatever the number
of processes.

Stream s of S reads records s::S of every source, packs its own rows and gives B/S rows of each
global batch; process p of P runs streams p*S/P .. (p+1)*S/P - 1 and concatenates their rows. So
a 1-process run and a 2-process run of the same config (same S) see the same global batches, and
each process reads records no other process reads. Each stream's iterator state is saved in its
own file (`stream_<s>-of-<S>.json`), so a checkpoint restores under another process count: every
process reads the files of the streams it runs now.
"""
import dataclasses
import json
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def num_streams(config) -> int:
  """data.streams, or one stream per process when it is 0."""
  return config.data.streams or jax.process_count()


def local_streams(config) -> list:
  """The stream indices this process runs."""
  total, processes = num_streams(config), jax.process_count()
  if total % processes:
    raise ValueError(f"data.streams={total} must be a multiple of the {processes} processes")
  per = total // processes
  return list(range(jax.process_index() * per, (jax.process_index() + 1) * per))


class _ConcatIterator(grain.DatasetIterator):

  def __init__(self, parents: dict, empty_like):
    super().__init__(list(parents.values()))
    self._by_stream = parents  # {stream: iterator}
    self._empty_like = empty_like
    self._exhausted = set()

  def __next__(self):
    batches = {}
    for stream, parent in self._by_stream.items():
      if stream in self._exhausted:
        continue
      try:
        batches[stream] = next(parent)
      except StopIteration:
        self._exhausted.add(stream)
    if not batches:
      raise StopIteration
    if self._empty_like is None and len(batches) < len(self._by_stream):
      raise StopIteration  # training streams are endless: one ending ends the epoch
    template = next(iter(batches.values()))
    parts = [batches[s] if s in batches else self._empty_like(template) for s in self._by_stream]
    out = {k: np.concatenate([p[k] for p in parts]) for k in template if k != "skipped"}
    out["skipped"] = [p["skipped"] for s, p in zip(self._by_stream, parts) if s in batches]
    return out

  def get_state(self):
    return {"streams": {str(s): p.get_state() for s, p in self._by_stream.items()},
            "exhausted": sorted(self._exhausted)}

  def set_state(self, state):
    for s, parent in self._by_stream.items():
      parent.set_state(state["streams"][str(s)])
    self._exhausted = set(state.get("exhausted", []))

  def close(self):
    for parent in self._by_stream.values():
      parent.close()


class ConcatStreams(grain.IterDataset):
  """Batches of several streams -> one batch with their rows in stream order.

  `empty_like(batch)`: an all-padding batch of that shape, used for streams that ended while
  others go on (evaluation); without it the first stream to end ends the iteration."""

  def __init__(self, parents: dict, empty_like=None):
    super().__init__(list(parents.values()))
    self._streams = dict(parents)
    self._empty_like = empty_like

  def __iter__(self):
    return _ConcatIterator({s: iter(d) for s, d in self._streams.items()}, self._empty_like)


def _stream_states(state) -> dict:
  """{stream: state} from the iterator's state (the outer prefetch/map stages pass it through)."""
  if "streams" not in state:
    raise ValueError("the data iterator state has no per-stream part")
  return state["streams"]


class StreamsCheckpointHandler(ocp.CheckpointHandler):
  """Orbax handler: each process writes and reads one JSON file per stream it runs."""

  def save(self, directory: epath.Path, args: "StreamsSave"):
    state = args.iterator.get_state()
    total = args.num_streams
    for stream, stream_state in _stream_states(state).items():
      (directory / f"stream_{stream}-of-{total}.json").write_text(json.dumps(stream_state))

  def restore(self, directory: epath.Path, args: "StreamsRestore"):
    total = args.num_streams
    states = {}
    for stream in args.streams:
      path = directory / f"stream_{stream}-of-{total}.json"
      if not path.exists():
        found = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint was written with another data.streams "
            f"(found {found}); resume with the data.streams it was written with")
      states[str(stream)] = json.loads(path.read_text())
    args.iterator.set_state({"streams": states, "exhausted": []})
    return args.iterator

  def metadata(self, directory):
    del directory
    return None


@ocp.args.register_with_handler(StreamsCheckpointHandler, for_save=True)
@dataclasses.dataclass
class StreamsSave(ocp.args.CheckpointArgs):
  iterator: Any
  num_streams: int


@ocp.args.register_with_handler(StreamsCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class StreamsRestore(ocp.args.CheckpointArgs):
  iterator: Any
  num_streams: int
  streams: list
