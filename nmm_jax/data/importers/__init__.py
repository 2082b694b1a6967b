"""Importers: published image-text formats -> `Document`s, for `nmm-data write`.

An importer lists its inputs cheaply (`items()`: small, picklable descriptions such as a JSONL
line or a tar member's offset) and converts one item at a time (`convert(item)`), so the writer
can spread the slow part (reading and checking images) over worker processes. A bad item raises
`BadItem(reason, detail)`: it is skipped and counted, and the run goes on.

  captions        a folder of images + a JSONL of {"image": path, "caption": text}
  interleaved     a JSONL of interleaved documents (OBELICS-like) referencing image files
  webdataset      WebDataset .tar shards: <key>.{jpg,png,...} + <key>.{txt,json}
  parquet         Parquet files of caption pairs or OBELICS-style interleaved rows (pyarrow)
  hf              a Hugging Face `datasets` dataset saved with save_to_disk
  tfds            any TFDS image+text dataset prepared as array_record (`tfds.data_source`)
  sklearn-digits  scikit-learn's bundled 8x8 handwritten digits, upsampled, captioned
"""


class BadItem(Exception):
  """An input item that cannot become a document; `reason` is the counted skip reason."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason, self.detail = reason, detail


FORMATS = ("captions", "interleaved", "webdataset", "parquet", "hf", "tfds", "sklearn-digits")


def make_importer(fmt: str, **options):
  """The importer for `fmt`; `options` are the `nmm-data write` flags that apply to it."""
  # Imported here: each format pulls in only its own dependencies (tfds, scikit-learn,
  # datasets).
  if fmt == "captions":
    from nmm_jax.data.importers.files import CaptionsImporter
    return CaptionsImporter(**options)
  if fmt == "interleaved":
    from nmm_jax.data.importers.files import InterleavedImporter
    return InterleavedImporter(**options)
  if fmt == "webdataset":
    from nmm_jax.data.importers.webdataset import WebDatasetImporter
    return WebDatasetImporter(**options)
  if fmt == "parquet":
    from nmm_jax.data.importers.parquet import ParquetImporter
    return ParquetImporter(**options)
  if fmt == "hf":
    from nmm_jax.data.importers.hf_datasets import HfDatasetImporter
    return HfDatasetImporter(**options)
  if fmt == "tfds":
    from nmm_jax.data.importers.tfds_source import TfdsImporter
    return TfdsImporter(**options)
  if fmt == "sklearn-digits":
    from nmm_jax.data.importers.digits import DigitsImporter
    return DigitsImporter(**options)
  raise ValueError(f"unknown input format {fmt!r}; expected one of {', '.join(FORMATS)}")
