"""Parquet files (OBELICS, LAION/DataComp metadata, most Hugging Face image-text sets), read a
row group at a time with pyarrow; rows become documents as rows.py says.

An item is (file, row group, row). conversion.py deals items to shards in contiguous runs, so a
worker converts consecutive rows: it keeps the one row group it is in (only the columns it needs)
and reads each row group about once. No file is ever read whole.
"""
import glob
import os

import pyarrow.parquet as pq

from nmm_jax.data.importers.rows import RowConverter, folder_of


class ParquetImporter:
  """`files`: Parquet paths or globs. Column flags as RowConverter."""

  def __init__(self, files: list, **columns):
    self.paths = sorted({p for pattern in files for p in (glob.glob(pattern) or [pattern])})
    if not self.paths:
      raise FileNotFoundError("no Parquet files given")
    self.rows = RowConverter(**columns)
    for path in self.paths:
      if not os.path.isfile(path):
        raise FileNotFoundError(f"Parquet file {path} does not exist")
      try:
        schema = pq.read_schema(path)
      except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise ValueError(f"{path} is not a readable Parquet file: {e}") from e
      self.rows.check_columns(schema.names, path)
    self._group_key, self._group = None, None

  def __getstate__(self):  # workers get the description, not the row group in memory
    return {**self.__dict__, "_group_key": None, "_group": None}

  def items(self):
    items = []
    for path in self.paths:
      metadata = pq.ParquetFile(path).metadata
      for group in range(metadata.num_row_groups):
        items += [(path, group, row) for row in range(metadata.row_group(group).num_rows)]
    return items

  def _row(self, path: str, group: int, row: int) -> dict:
    if self._group_key != (path, group):
      self._group = None  # the previous row group goes before the next one is read
      self._group = pq.ParquetFile(path).read_row_group(group, columns=self.rows.columns)
      self._group_key = (path, group)
    return self._group.slice(row, 1).to_pylist()[0]

  def convert(self, item):
    path, group, row = item
    segments, meta = self.rows.convert(self._row(path, group, row),
                                       f"{path}[row group {group}, row {row}]", folder_of(path))
    return segments, {**meta, "file": os.path.basename(path), "row_group": group, "row": row}
