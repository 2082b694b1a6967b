"""Helpers shared by the nmm-data commands: finding shards, reading their documents."""
import glob
import os

import numpy as np

from nmm_jax.data.records import decode_document
from nmm_jax.data.stages import RecordError, ShardedRecords
from nmm_jax.data.tokenizer import tokenizer_in


def expand_shards(paths: list, split: str = "") -> list:
  """Shard files from files, folders (searched recursively) and globs; `split` keeps only
  `<split>-*` shards. Raises FileNotFoundError naming what matched nothing."""
  found = []
  for pattern in paths:
    matches = glob.glob(pattern) or [pattern]
    for path in matches:
      if os.path.isdir(path):
        found += glob.glob(os.path.join(path, "**", "*.array_record"), recursive=True)
      elif os.path.isfile(path):
        found.append(path)
      else:
        raise FileNotFoundError(f"{path}: no such file or folder")
  if split:
    found = [p for p in found if os.path.basename(p).startswith(f"{split}-")]
  if not found:
    raise FileNotFoundError(f"no {split + ' ' if split else ''}.array_record shards under "
                            f"{', '.join(paths)}")
  return sorted(set(found))


def find_tokenizer(shard_paths: list) -> str:
  """A tokenizer file in a shard's folder or any parent up to the root (the data folder keeps
  it beside the source folders); '' if none."""
  folder = os.path.dirname(os.path.abspath(shard_paths[0]))
  while True:
    found = tokenizer_in(folder)
    if found:
      return found
    parent = os.path.dirname(folder)
    if parent == folder:
      return ""
    folder = parent


def iter_documents(shard_paths: list, max_per_shard: int = 0):
  """Yields (where, Document | error string); `max_per_shard` > 0 reads that many records spread
  evenly over each shard."""
  for path in shard_paths:
    records = ShardedRecords([path])
    if records.unreadable:
      yield path, "unreadable shard"
      continue
    indices = np.arange(len(records))
    if max_per_shard and len(records) > max_per_shard:
      indices = np.linspace(0, len(records) - 1, max_per_shard).round().astype(int)
    for index in indices:
      where, raw = records[int(index)]
      if isinstance(raw, RecordError):
        yield where, raw.detail
        continue
      try:
        yield where, decode_document(raw)
      except Exception as e:  # any malformed record: reported, not fatal
        yield where, f"{type(e).__name__}: {e}"
