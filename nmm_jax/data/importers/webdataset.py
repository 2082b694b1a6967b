"""WebDataset `.tar` shards: files grouped by key, `<key>.<image ext>` + `<key>.txt` or `.json`.

The key is the member path up to the first dot of its file name (the WebDataset convention), so
`a/b/000017.jpg` and `a/b/000017.txt` form one sample. Listing reads only the tar headers; each
item remembers where its members' bytes are, and a worker reads just those. Compressed tars
(`.tar.gz`) cannot be read at an offset, so their bytes are kept in the item instead.
"""
import glob
import os
import tarfile

from nmm_jax.data.importers import BadItem
from nmm_jax.data.importers.common import clean_text, image_segment, parse_json_object

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
TEXT_EXTENSIONS = ("txt", "json")


def _split_key(name: str):
  directory, base = os.path.split(name)
  stem, _, ext = base.partition(".")
  return os.path.join(directory, stem), ext.lower()


class WebDatasetImporter:
  """`shards`: tar paths or globs. From a `.json` member the caption is `text_key` (default
  "caption", falling back to "text"); the rest of the JSON goes to the metadata."""

  def __init__(self, shards: list, text_key: str = "caption", max_image_side: int = 0):
    self.paths = sorted({p for pattern in shards for p in (glob.glob(pattern) or [pattern])})
    for path in self.paths:
      if not os.path.isfile(path):
        raise FileNotFoundError(f"WebDataset shard {path} does not exist")
    self.text_key, self.max_image_side = text_key, max_image_side

  def items(self):
    items = []
    for path in self.paths:
      compressed = not path.endswith(".tar")
      samples = {}
      try:
        with tarfile.open(path, "r:*") as tar:
          for member in tar:
            if not member.isfile():
              continue
            key, ext = _split_key(member.name)
            if compressed:  # no random access into a compressed stream: keep the bytes
              where = tar.extractfile(member).read()
            else:
              where = (member.offset_data, member.size)
            samples.setdefault(key, {})[ext] = where
      except (tarfile.TarError, OSError) as e:
        # A truncated tar still yields the samples before the damage; they are kept.
        items.append((path, "", {"error": f"{type(e).__name__}: {e}"}))
      items += [(path, key, members) for key, members in samples.items()]
    return items

  def _read(self, path, location):
    if isinstance(location, bytes):
      return location
    offset, size = location
    with open(path, "rb") as f:
      f.seek(offset)
      return f.read(size)

  def convert(self, item):
    path, key, members = item
    where = f"{path}[{key}]"
    if "error" in members:
      raise BadItem("read_error", f"{path}: {members['error']} (samples before it were read)")
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    text_ext = next((e for e in TEXT_EXTENSIONS if e in members), None)
    if image_ext is None or text_ext is None:
      raise BadItem("incomplete", f"{where}: members {sorted(members)} lack an image "
                    f"({'/'.join(IMAGE_EXTENSIONS)}) or a caption ({'/'.join(TEXT_EXTENSIONS)})")
    image = image_segment(self._read(path, members[image_ext]), where, self.max_image_side)
    raw_text = self._read(path, members[text_ext]).decode("utf-8", errors="replace")
    meta = {"key": key}
    if text_ext == "json":
      row = parse_json_object(f"{where}.json", raw_text)
      caption_key = self.text_key if self.text_key in row else "text"
      raw_text = row.get(caption_key)
      meta.update({k: v for k, v in row.items() if k != caption_key})
    return (image, clean_text(raw_text, where)), meta
