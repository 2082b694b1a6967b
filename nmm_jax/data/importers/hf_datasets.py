"""A Hugging Face `datasets` dataset saved with `save_to_disk`: rows become documents as rows.py
says. Rows are read in Arrow form, so Image features arrive as their stored {"bytes", "path"}
(decoded once, by the image check) and nothing is loaded whole: the files are memory-mapped.
"""
import os

from nmm_jax.data.importers.rows import RowConverter


class HfDatasetImporter:
  """`path`: the save_to_disk folder; `split` picks one split of a DatasetDict."""

  def __init__(self, path: str, split: str = "", **columns):
    self.path, self.split = path, split
    self.rows = RowConverter(**columns)
    self._dataset = None
    self.rows.check_columns(self._open().column_names, path)

  def __getstate__(self):  # workers open the folder themselves (memory-mapped, cheap)
    return {**self.__dict__, "_dataset": None}

  def _open(self):
    if self._dataset is None:
      import datasets  # the data extra; imported here so other formats never need it
      if not os.path.isdir(self.path):
        raise FileNotFoundError(f"Hugging Face dataset folder {self.path} does not exist")
      loaded = datasets.load_from_disk(self.path)
      if isinstance(loaded, datasets.DatasetDict):
        if not self.split:
          raise ValueError(f"{self.path} holds splits {sorted(loaded)}; pick one with "
                           "--hf_split")
        if self.split not in loaded:
          raise ValueError(f"{self.path} has no split {self.split!r} (splits: "
                           f"{sorted(loaded)})")
        loaded = loaded[self.split]
      self._dataset = loaded.select_columns(self.rows.columns).with_format("arrow")
    return self._dataset

  def items(self):
    return list(range(len(self._open())))

  def convert(self, index):
    row = self._open()[index].to_pylist()[0]
    segments, meta = self.rows.convert(row, f"{self.path}[{index}]", self.path)
    return segments, {**meta, "row": index}
