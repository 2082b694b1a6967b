"""`nmm-data write`: an importer's items -> ArrayRecord shards of one source, in parallel.

  OUT/<source>/train-00000-of-0000N.array_record ...   (the layout the pipeline reads)
  OUT/<source>/eval-00000-of-0000M.array_record ...
  OUT/<source>/manifest.json                            (counts, skips, inputs, schema version)

Items are split into train/eval by a seeded permutation, then dealt to shards in contiguous runs
(so an importer reading row groups, as Parquet's does, reads each about once; Grain shuffles
records anyway); each shard is written by one worker process (`workers`), so the output does not
depend on how many there are. Everything is written into a staging folder that replaces
OUT/<source> only when all shards are complete: an interrupted run leaves the previous data
untouched. A bad item is skipped, counted by reason, and the first few are printed with where they
came from. A conversion that skips more than `max_skip_fraction` of its items, or writes no
document, fails (ConversionError) and leaves the previous data untouched.
"""
import collections
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from nmm_jax.data.importers import BadItem
from nmm_jax.data.records import SCHEMA_VERSION, Document, encode_document

LOGGED_SKIPS = 5
MANIFEST = "manifest.json"


@dataclasses.dataclass
class ShardResult:
  split: str
  documents: int = 0
  images: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: list = dataclasses.field(default_factory=list)  # first few skip messages


def split_items(num_items: int, eval_fraction: float, seed: int) -> dict:
  """{"train": indices, "eval": indices}, each sorted; eval gets round(fraction * n) items (at
  least one when the fraction is positive and there are two or more items)."""
  num_eval = round(eval_fraction * num_items)
  if eval_fraction > 0 and num_items > 1:
    num_eval = max(1, num_eval)
  order = np.random.default_rng(seed).permutation(num_items)
  return {"train": np.sort(order[num_eval:]).tolist(), "eval": np.sort(order[:num_eval]).tolist()}


# Per worker process: the importer and the shared progress counter (set by _init_worker).
_importer, _progress = None, None


def _init_worker(importer, progress):
  global _importer, _progress
  _importer, _progress = importer, progress


def _write_shard(task) -> ShardResult:
  split, path, source, items = task
  result = ShardResult(split)
  # group_size:1 keeps every record individually addressable: Grain reads at random.
  writer = ArrayRecordWriter(path, "group_size:1")
  try:
    for item in items:
      try:
        segments, meta = _importer.convert(item)
        doc = Document(source, tuple(segments), meta)
        writer.write(encode_document(doc))
        result.documents += 1
        result.images += doc.num_images
      except BadItem as e:
        result.skipped[e.reason] += 1
        if len(result.examples) < LOGGED_SKIPS:
          result.examples.append(str(e))
      except Exception as e:  # not bad input but a bug or a broken setup: stop, say where
        e.add_note(f"nmm-data write: while converting item {repr(item)[:200]}")
        raise
      with _progress.get_lock():
        _progress.value += 1
  finally:
    writer.close()
  return result


def _shard_tasks(items, splits, staging, source, num_shards):
  tasks = []
  for split, indices in splits.items():
    if not indices:
      continue
    count = num_shards if split == "train" else max(1, math.ceil(num_shards * len(indices)
                                                                 / max(1, len(items))))
    count = min(count, len(indices))
    for shard, run in enumerate(np.array_split(np.asarray(indices), count)):
      path = os.path.join(staging, f"{split}-{shard:05d}-of-{count:05d}.array_record")
      tasks.append((split, path, source, [items[i] for i in run]))
  return tasks


def write_source(importer, out_dir: str, source: str, *, num_shards: int = 8,
                 eval_fraction: float = 0.05, workers: int = 1, seed: int = 0,
                 overwrite: bool = False, inputs: dict | None = None,
                 show_progress: bool = True, max_skip_fraction: float = 0.5) -> dict:
  """Writes OUT_DIR/SOURCE from `importer`; returns the summary (also saved as manifest.json)."""
  if (num_shards < 1 or workers < 0 or not 0 <= eval_fraction < 1
      or not 0 <= max_skip_fraction <= 1):
    raise ValueError(f"need num_shards >= 1, workers >= 0, 0 <= eval_fraction < 1, "
                     f"0 <= max_skip_fraction <= 1; got {num_shards}, {workers}, "
                     f"{eval_fraction}, {max_skip_fraction}")
  final = os.path.join(out_dir, source)
  if os.path.exists(final) and not overwrite:
    raise FileExistsError(f"{final} exists; pass --overwrite to replace it")
  start = time.perf_counter()
  items = importer.items()
  if not items:
    raise ValueError(f"the input holds no items for source {source!r}")
  splits = split_items(len(items), eval_fraction, seed)
  os.makedirs(out_dir, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{source}.partial-", dir=out_dir)
  try:
    tasks = _shard_tasks(items, splits, staging, source, num_shards)
    results = _run_tasks(importer, tasks, len(items), workers, show_progress)
    summary = _summary(results, source, len(tasks), time.perf_counter() - start, inputs)
    _check_skips(summary, len(items), max_skip_fraction, final)
    with open(os.path.join(staging, MANIFEST), "w") as f:
      json.dump(summary, f, indent=2, sort_keys=True)
    if os.path.exists(final):
      shutil.rmtree(final)
    os.rename(staging, final)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return summary


class ConversionError(ValueError):
  """Too many items skipped, or no document written: nothing was replaced."""


def _check_skips(summary: dict, num_items: int, max_skip_fraction: float, final: str):
  skipped = sum(summary["skipped"].values())
  written = sum(summary["documents"].values())
  if written and skipped <= max_skip_fraction * num_items:
    return
  why = ("no document was written" if not written else
         f"{skipped} of {num_items} items ({skipped / num_items:.0%}) were skipped, more than "
         f"--max_skip_fraction={max_skip_fraction}")
  reasons = "".join(f"\n  {reason}: {n}" for reason, n in sorted(summary["skipped"].items()))
  examples = "".join(f"\n  e.g. {example}" for example in summary["skip_examples"])
  kept = "left as it was" if os.path.exists(final) else "not created"
  raise ConversionError(f"{why}; {final} is {kept}. Skipped:{reasons}{examples}")


def _run_tasks(importer, tasks, total, workers, show_progress):
  progress_bar = tqdm(total=total, desc="write", unit="doc", dynamic_ncols=True,
                      disable=not show_progress, file=sys.stderr)
  ctx = multiprocessing.get_context("spawn")  # no fork: the parent may hold threads
  counter = ctx.Value("l", 0)
  try:
    if workers <= 1:
      _init_worker(importer, counter)
      results = []
      for task in tasks:
        results.append(_write_shard(task))
        progress_bar.update(counter.value - progress_bar.n)
      return results
    with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker,
                  initargs=(importer, counter)) as pool:
      pending = pool.map_async(_write_shard, tasks, chunksize=1)
      while not pending.ready():
        pending.wait(0.25)
        progress_bar.update(counter.value - progress_bar.n)
      return pending.get()
  finally:
    progress_bar.update(counter.value - progress_bar.n)
    progress_bar.close()


def _summary(results, source, num_shards, seconds, inputs) -> dict:
  documents = collections.Counter()
  images = 0
  skipped = collections.Counter()
  examples = []
  for r in results:
    documents[r.split] += r.documents
    images += r.images
    skipped.update(r.skipped)
    examples += r.examples
  return {"schema_version": SCHEMA_VERSION, "source": source, "inputs": inputs or {},
          "documents": dict(documents), "images": images, "skipped": dict(skipped),
          "skip_examples": examples[:LOGGED_SKIPS], "shards": num_shards,
          "seconds": round(seconds, 2)}


def format_summary(summary: dict, final_dir: str) -> str:
  docs = summary["documents"]
  lines = [f"wrote {final_dir}: {docs.get('train', 0)} train + {docs.get('eval', 0)} eval "
           f"documents, {summary['images']} images, {summary['shards']} shards in "
           f"{summary['seconds']:.1f} s"]
  total_skipped = sum(summary["skipped"].values())
  lines.append(f"skipped {total_skipped}" + "".join(
      f"\n  {reason}: {n}" for reason, n in sorted(summary["skipped"].items())))
  lines += [f"  e.g. {example}" for example in summary["skip_examples"]]
  return "\n".join(lines)
