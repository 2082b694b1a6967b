"""nmm-data write --from=parquet / --from=hf: files written here with pyarrow and datasets, bad
rows included; decoded records equal the inputs, skips are counted by reason, a row group at a
time is in memory, and a conversion that skips too much fails and replaces nothing."""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_write import image_bytes, read_source, write

from nmm_jax.data import conversion
from nmm_jax.data.importers import make_importer

ROW_GROUP = 3


def _write_parquet(path, columns: dict):
  pq.write_table(pa.table(columns), str(path), row_group_size=ROW_GROUP)
  return str(path)


def _caption_rows(tmp_path):
  """(rows as columns, expected (image bytes, caption) of the good ones, skips by reason)."""
  red, blue = image_bytes("PNG", "red"), image_bytes("JPEG", "blue")
  (tmp_path / "pics").mkdir()
  (tmp_path / "pics" / "green.png").write_bytes(image_bytes("PNG", "green"))
  images = [{"bytes": red, "path": None},               # Hugging Face's Image storage
            {"bytes": None, "path": "pics/green.png"},  # a path under --images
            {"bytes": blue, "path": "ignored.jpg"},     # bytes win over the path
            {"bytes": b"not an image", "path": None},   # bad_image
            {"bytes": red, "path": None},               # null caption: empty
            {"bytes": None, "path": "https://example.com/x.jpg"},  # a URL: missing_image
            {"bytes": None, "path": "pics/nowhere.png"},           # missing_image
            {"bytes": blue, "path": None}]
  captions = ["a red square", "a green square", "  a blue square ", "corrupt", None, "url",
              "missing", "another blue square"]
  expected = [(red, "a red square"), (image_bytes("PNG", "green"), "a green square"),
              (blue, "a blue square"), (blue, "another blue square")]
  return {"image": images, "caption": captions}, expected, {"bad_image": 1, "empty": 1,
                                                            "missing_image": 2}


def _pairs(docs):
  return [(doc.segments[0].encoded, doc.segments[1]) for doc in docs]


def test_caption_pairs_from_parquet_row_groups(tmp_path, monkeypatch):
  columns, expected, skips = _caption_rows(tmp_path)
  path = _write_parquet(tmp_path / "pairs.parquet", columns)
  assert pq.ParquetFile(path).metadata.num_row_groups == 3
  reads = []
  original = pq.ParquetFile.read_row_group

  def read_row_group(self, i, *args, **kwargs):
    table = original(self, i, *args, **kwargs)
    reads.append((i, table.num_rows, tuple(table.column_names)))
    return table
  monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
  monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read a whole file"))

  importer = make_importer("parquet", files=[str(tmp_path / "*.parquet")], images=str(tmp_path))
  summary = write(importer, tmp_path / "out", "caption")
  docs = read_source(tmp_path / "out" / "caption")
  assert sorted(_pairs(docs)) == sorted(expected)
  assert summary["skipped"] == skips
  assert any("img2dataset" in e for e in summary["skip_examples"])
  assert docs[0].meta["file"] == "pairs.parquet" and "row_group" in docs[0].meta
  # One row group in memory at a time, only the two columns, and each read about once: the
  # rows go to the 2 shards in contiguous runs, so at most one group is read by both.
  assert all(rows <= ROW_GROUP and names == ("image", "caption") for _, rows, names in reads)
  assert len(reads) <= 3 + 1


def test_interleaved_rows_from_parquet(tmp_path):
  a, b = image_bytes("PNG", "red"), image_bytes("PNG", "blue")
  texts = [["first", None, "second"], [None, "only text after an image"],
           ["mismatched", None], ["both set"], [None, "x"], ["no image here"]]
  images = [[None, {"bytes": a, "path": None}, None], [{"bytes": b, "path": None}, None],
            [None], [{"bytes": a, "path": None}], ["http://example.com/1.jpg", None], [None]]
  # The image structs and the URL string cannot share one Arrow column: two files.
  first = _write_parquet(tmp_path / "docs-0.parquet", {"texts": texts[:4], "images": images[:4]})
  _write_parquet(tmp_path / "docs-1.parquet", {"texts": texts[4:], "images": images[4:]})
  importer = make_importer("parquet", files=[first, str(tmp_path / "docs-1.parquet")],
                           texts_column="texts", images_column="images")
  summary = write(importer, tmp_path / "out", "interleaved")
  docs = read_source(tmp_path / "out" / "interleaved")
  got = [tuple(s if isinstance(s, str) else s.encoded for s in d.segments) for d in docs]
  assert sorted(got, key=repr) == sorted([("first", a, "second"), (b, "only text after an image"),
                                          ("no image here",)], key=repr)
  # mismatched lengths and a position with both set: unparsable; the URL: missing_image.
  assert summary["skipped"] == {"unparsable": 2, "missing_image": 1}


def test_bad_parquet_input_fails_by_name(tmp_path):
  path = _write_parquet(tmp_path / "pairs.parquet", {"img": [b"x"], "text": ["t"]})
  with pytest.raises(ValueError, match=r"pairs.parquet: no column 'image', 'caption' "
                                       r"\(columns: img, text\); choose them with --image_col"):
    make_importer("parquet", files=[path])
  (tmp_path / "junk.parquet").write_bytes(b"not parquet")
  with pytest.raises(ValueError, match="junk.parquet is not a readable Parquet file"):
    make_importer("parquet", files=[str(tmp_path / "junk.parquet")])
  with pytest.raises(ValueError, match="need both --texts_column and --images_column"):
    make_importer("parquet", files=[path], texts_column="text")


def test_caption_pairs_from_a_saved_hf_dataset(tmp_path):
  datasets = pytest.importorskip("datasets")
  columns, expected, skips = _caption_rows(tmp_path)
  # Rows whose image is only a path are left out: save_to_disk itself needs those files.
  keep = [i for i, image in enumerate(columns["image"]) if image["bytes"]]
  columns = {k: [v[i] for i in keep] for k, v in columns.items()}
  expected = [pair for pair in expected if pair[1] != "a green square"]
  skips = {"bad_image": 1, "empty": 1}
  features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
  dataset = datasets.Dataset.from_dict(columns, features=features)
  datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(
      str(tmp_path / "hf"))
  with pytest.raises(ValueError, match=r"holds splits \['test', 'train'\]; pick one"):
    make_importer("hf", path=str(tmp_path / "hf"))
  importer = make_importer("hf", path=str(tmp_path / "hf"), split="train",
                           images=str(tmp_path))
  summary = conversion.write_source(importer, str(tmp_path / "out"), "caption", num_shards=2,
                                    eval_fraction=0.0, workers=2, show_progress=False,
                                    max_skip_fraction=1.0)
  assert sorted(_pairs(read_source(tmp_path / "out" / "caption"))) == sorted(expected)
  assert summary["skipped"] == skips


def _nmm_data(*args):
  return subprocess.run([sys.executable, "-m", "nmm_jax.data.cli", "write", *args],
                        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_a_conversion_that_skips_too_much_fails_and_keeps_the_old_data(tmp_path):
  columns, _, _ = _caption_rows(tmp_path)
  good = _write_parquet(tmp_path / "good.parquet", columns)
  out = tmp_path / "out"
  done = _nmm_data("--from=parquet", f"--out={out}", f"--images={tmp_path}", "--workers=2",
                   "--num_shards=2", good)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "4 train + 0 eval documents" in done.stdout or "3 train + 1 eval" in done.stdout
  manifest = (out / "caption" / "manifest.json").read_text()

  # A wrong --images root: every path-referenced image is missing, most rows skipped.
  paths = _write_parquet(tmp_path / "paths.parquet",
                         {"image": ["pics/green.png"] * 4 + ["pics/nowhere.png"],
                          "caption": ["green"] * 5})
  failed = _nmm_data("--from=parquet", f"--out={out}", "--images=/nowhere", "--overwrite",
                     paths)
  assert failed.returncode == 1
  assert "no document was written" in failed.stderr
  assert "missing_image: 5" in failed.stderr and "e.g. missing_image" in failed.stderr
  assert f"{out / 'caption'} is left as it was" in failed.stderr
  assert (out / "caption" / "manifest.json").read_text() == manifest
  assert [p for p in os.listdir(out) if p != "caption"] == []  # no staging left behind

  # Over the limit, though some documents were written.
  half = _nmm_data("--from=parquet", f"--out={out}", f"--images={tmp_path}", "--overwrite",
                   "--max_skip_fraction=0.3", good)
  assert half.returncode == 1 and "4 of 8 items (50%) were skipped" in half.stderr
  assert json.loads((out / "caption" / "manifest.json").read_text()) == json.loads(manifest)
