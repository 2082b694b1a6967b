"""Where a run's files live: a local folder or an object store (gs://, s3://), through etils.epath.

Checkpoints go through Orbax and TensorStore, which write to buckets natively. The rest is here:
- `path`: a local path made absolute (the process may change folders), a URI kept as it is.
- `LineLog`: metrics.jsonl. Local files are appended to line by line. An object cannot be
  appended to, so in a bucket the whole object is written again on `flush()` (train/metrics.py
  flushes every 30 s and before every checkpoint save, so a killed run loses no record of the
  steps its checkpoints hold).
- `StagedFolder`: a local folder uploaded to the bucket, for writers of local files only.
- `local_copy`: a bucket folder copied to a local cache. ArrayRecord reads shards through
  riegeli's file reader, which opens local files only in its open-source build; so Grain reads
  the copy. A corpus larger than the local disk is read from a gcsfuse mount instead, a local
  path to this code.
"""
import json
import os
import shutil
import tempfile

from etils import epath

# The object stores whose file access etils.epath provides (through fsspec: gcsfs, s3fs).
_FSSPEC_PACKAGES = {"gs": "gcsfs", "s3": "s3fs"}


def is_remote(path) -> bool:
  return "://" in str(path)


def path(location) -> epath.Path:
  """`location` as an epath.Path: absolute if local, a URI as given."""
  if is_remote(location):
    _check_scheme(str(location))
    return epath.Path(location)
  return epath.Path(os.path.abspath(location))


def join(location, *parts) -> str:
  """os.path.join for local paths and URIs alike."""
  return str(path(location).joinpath(*parts)) if is_remote(location) else os.path.join(
      location, *parts)


def _check_scheme(uri: str):
  scheme = uri.split("://", 1)[0]
  if scheme not in _FSSPEC_PACKAGES:
    raise ValueError(f"{uri}: unsupported scheme {scheme}:// (local paths, "
                     f"{', '.join(s + '://' for s in _FSSPEC_PACKAGES)} are)")
  package = _FSSPEC_PACKAGES[scheme]
  try:
    __import__(package)
  except ImportError:
    raise ImportError(f"{uri}: {scheme}:// paths need the {package} package "
                      f"(pip install {package}; `EXTRAS=gcs bash scripts/setup.sh` installs "
                      "gcsfs)") from None


class LineLog:
  """A text file of lines (metrics.jsonl): appended to in place on a local disk; in a bucket (an
  object cannot be appended to) kept in memory and written whole by `flush`."""

  def __init__(self, location):
    self.path = path(location)
    self.remote = is_remote(location)
    self._lines = None  # in a bucket: every line of the object, to write it whole

  def read_lines(self) -> list[str]:
    """The non-empty lines of the file, each ending in a newline (none if it does not exist)."""
    if self._lines is not None:
      return list(self._lines)
    if not self.path.exists():
      return []
    return [line + "\n" for line in self.path.read_text().splitlines() if line.strip()]

  def rewrite(self, lines: list[str]):
    """Replaces the file's content by `lines` (each ending in a newline), atomically."""
    if self.remote:
      self._lines = list(lines)
      self.flush()
      return
    tmp = epath.Path(str(self.path) + ".tmp")
    tmp.write_text("".join(lines))
    tmp.replace(self.path)

  def append(self, line: str):
    if not self.remote:
      with self.path.open("a") as f:
        f.write(line)
      return
    if self._lines is None:
      self._lines = self.read_lines()
    self._lines.append(line)

  def flush(self):
    """In a bucket: the object written again with every line so far (a no-op locally)."""
    if self.remote and self._lines is not None:
      self.path.write_text("".join(self._lines))


def read_jsonl(location) -> list[dict]:
  """The records of a .jsonl file, local or in a bucket ([] if it does not exist)."""
  return [json.loads(line) for line in LineLog(location).read_lines()]


def cache_root(cache_dir: str = "") -> str:
  """data.cache_dir, or $XDG_CACHE_HOME/nmm_jax (~/.cache/nmm_jax) when it is empty."""
  default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                         "nmm_jax")
  return os.path.abspath(cache_dir or default)


def copy_location(uri: str, cache_dir: str) -> str:
  """Where `local_copy` puts the copy of `uri`: cache_dir/<scheme>/<bucket>/<path>."""
  scheme, rest = str(uri).rstrip("/").split("://", 1)
  return os.path.join(cache_root(cache_dir), scheme, rest)


def local_copy(uri: str, cache_dir: str, *, progress: bool = True) -> str:
  """The local path of a copy of the bucket folder or file `uri` (`copy_location`), made now.

  A file copied before is kept when its size and modification time in the bucket are those in
  the copy's manifest; each file is written beside its place and renamed in, so processes that
  share a host (and a cache) never read a half-copied shard.
  """
  from tqdm import tqdm
  source, dest = path(uri), copy_location(uri, cache_dir)
  if source.is_dir():
    files, base = [], str(source).split("://", 1)[-1].rstrip("/")
    for folder, _, names in source.walk():  # folders as bucket/path, without the scheme
      inside = os.path.relpath(str(folder).split("://", 1)[-1], base)
      for name in names:
        relative = os.path.normpath(os.path.join(inside, name))
        files.append((source / relative, relative))
    root, manifest_path = dest, os.path.join(dest, ".nmm-copied.json")
  elif source.exists():
    files = [(source, os.path.basename(dest))]
    root = os.path.dirname(dest)
    manifest_path = os.path.join(root, f".{os.path.basename(dest)}.nmm-copied.json")
  else:
    raise FileNotFoundError(f"{uri} does not exist (or cannot be read)")
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    manifest = {}
  todo = []
  for file, relative in files:
    stat = file.stat()
    fingerprint = [stat.length, stat.mtime]
    if manifest.get(relative) != fingerprint or not os.path.exists(os.path.join(root, relative)):
      todo.append((file, relative, fingerprint))
  with tqdm(total=sum(t[2][0] for t in todo), unit="B", unit_scale=True,
            disable=not (todo and progress), desc=f"copying {uri}") as bar:
    for file, relative, fingerprint in todo:
      target = os.path.join(root, relative)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      tmp = f"{target}.{os.getpid()}.part"
      with file.open("rb") as src, open(tmp, "wb") as out:
        while chunk := src.read(8 << 20):
          out.write(chunk)
          bar.update(len(chunk))
      os.replace(tmp, target)
      manifest[relative] = fingerprint
  if todo:
    tmp = f"{manifest_path}.{os.getpid()}.part"
    with open(tmp, "w") as f:
      json.dump(manifest, f)
    os.replace(tmp, manifest_path)
  return dest


class StagedFolder:
  """A folder a writer that only writes local files (jax.profiler, TensorBoard's event writer)
  writes to: `location` itself when it is local; else a temporary local folder that `sync`
  uploads to the bucket and `close` uploads and removes."""

  def __init__(self, location: str, prefix: str = "nmm-staged-"):
    self.location = location
    self.local = tempfile.mkdtemp(prefix=prefix) if is_remote(location) else location

  def sync(self):
    if self.local != self.location:
      upload(self.local, self.location)

  def close(self):
    self.sync()
    if self.local != self.location:
      shutil.rmtree(self.local, ignore_errors=True)


def upload(local_dir: str, uri: str):
  """Copies the local folder `local_dir` into the bucket folder `uri`, file by file."""
  target = path(uri)
  for folder, _, names in os.walk(local_dir):
    for name in names:
      relative = os.path.relpath(os.path.join(folder, name), local_dir)
      destination = target / relative
      destination.parent.mkdir(parents=True, exist_ok=True)
      with open(os.path.join(folder, name), "rb") as src, destination.open("wb") as out:
        shutil.copyfileobj(src, out, 8 << 20)
