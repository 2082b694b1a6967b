"""Finding data on disk: a split's shards, shard globs, their documents, the tokenizer beside
them, and a run's data folder (data.dir, or the embedded data under WORKDIR/data).

A data folder is  DIR/<source>/{train,eval}-*.array_record  with a tokenizer file in DIR.
"""
import glob
import os

import jax
import numpy as np

from nmm_jax import storage
from nmm_jax.data import tokenizer as tokenizer_lib
from nmm_jax.data import writer
from nmm_jax.data.records import decode_document
from nmm_jax.data.stages import RecordError, ShardedRecords

# The names a data folder's own tokenizer may have, in the order they are looked for.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def shard_paths(directory: str, split: str) -> list[str]:
  """DIRECTORY/<split>-*.array_record, sorted; [] when the folder does not exist."""
  if not os.path.isdir(directory):
    return []
  return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                if f.startswith(f"{split}-") and f.endswith(".array_record"))


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


def tokenizer_in(folder: str) -> str:
  """The path of the tokenizer file in `folder` (TOKENIZER_FILES), or '' if there is none."""
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  return ""


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


def run_data_folder(config, workdir: str) -> str:
  """Where a run reads its shards: data.dir (its local copy when it is in a bucket), or
  WORKDIR/data, the embedded data (data.synthetic; in the local cache when the workdir is in a
  bucket). Reads nothing: the folder may not exist yet (see `ensure_data_dir`)."""
  if config.data.dir:
    if storage.is_remote(config.data.dir):
      return storage.copy_location(config.data.dir, config.data.cache_dir)
    return config.data.dir
  if storage.is_remote(workdir):
    s = config.data.synthetic
    world = f"world{s.entities}-zipf{s.zipf}-" if s.kind == "world" else ""
    return os.path.join(storage.cache_root(config.data.cache_dir), "embedded",
                        f"{world}docs{s.train_docs}-{s.eval_docs}-size{config.data.image_size}"
                        f"-seed{s.seed}")
  return os.path.join(workdir, "data")


def ensure_data_dir(config, workdir: str) -> str:
  """The local shard folder: data.dir (which must exist; copied to data.cache_dir first when it
  is in a bucket), or the embedded data (`run_data_folder`), built first when it is not
  complete yet."""
  if config.data.dir:
    if storage.is_remote(config.data.dir):
      return storage.local_copy(config.data.dir, config.data.cache_dir,
                                progress=jax.process_index() == 0)
    if not os.path.isdir(config.data.dir):
      raise FileNotFoundError(f"config.data.dir={config.data.dir!r} is not a folder")
    return config.data.dir
  directory = run_data_folder(config, workdir)
  s = config.data.synthetic
  writer.build_embedded_dataset(directory, train_docs=s.train_docs, eval_docs=s.eval_docs,
                                image_size=config.data.image_size, seed=s.seed, kind=s.kind,
                                entities=s.entities, zipf=s.zipf)
  return directory


def tokenizer_path(config, directory: str) -> str:
  """data.tokenizer (a local copy when it is in a bucket), or the tokenizer file beside the
  shards."""
  if config.data.tokenizer:
    if storage.is_remote(config.data.tokenizer):
      return storage.local_copy(config.data.tokenizer, config.data.cache_dir, progress=False)
    return config.data.tokenizer
  found = tokenizer_in(directory)
  if found:
    return found
  raise FileNotFoundError(f"no tokenizer: set config.data.tokenizer or put one of "
                          f"{TOKENIZER_FILES} in {directory}")


def load_tokenizer(config, directory: str) -> tokenizer_lib.Tokenizer:
  """The tokenizer of the shards in `directory` (`tokenizer_path`)."""
  return tokenizer_lib.load_tokenizer(tokenizer_path(config, directory))
