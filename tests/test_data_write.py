"""nmm-data write: each input format -> shards whose decoded records equal what was written; bad
items skipped and counted; parallel output identical to serial; nothing lost on a crash."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from nmm_jax.data import conversion
from nmm_jax.data.importers import make_importer
from nmm_jax.data.records import ImageSegment
from nmm_jax.data.shards import expand_shards, iter_documents


def image_bytes(fmt: str, colour, size=(12, 10)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, colour).save(buffer, format=fmt)
  return buffer.getvalue()


def read_source(directory: str) -> list:
  """All documents of a written source folder, train then eval, in shard order."""
  docs = []
  for where, doc in iter_documents(expand_shards([str(directory)])):
    assert not isinstance(doc, str), (where, doc)
    docs.append(doc)
  return docs


def write(importer, out, source, **kwargs):
  kwargs.setdefault("eval_fraction", 0.0)
  kwargs.setdefault("workers", 1)
  # The fixtures are mostly bad items on purpose; the skip limit has its own test.
  kwargs.setdefault("max_skip_fraction", 1.0)
  return conversion.write_source(importer, str(out), source, num_shards=2,
                                 show_progress=False, **kwargs)


@pytest.fixture
def caption_folder(tmp_path):
  files = {"a.png": image_bytes("PNG", "red"), "sub/b.jpg": image_bytes("JPEG", "blue"),
           "c.bmp": image_bytes("BMP", "green"), "bad.png": b"not an image",
           "cut.jpg": image_bytes("JPEG", "white", (64, 64))[:200]}
  for name, data in files.items():
    os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
    (tmp_path / name).write_bytes(data)
  lines = [
      {"image": "a.png", "caption": "a red square", "id": 1},
      {"image": "sub/b.jpg", "caption": "  a blue square  "},
      {"image": "c.bmp", "caption": "a green square"},
      {"image": "nope.png", "caption": "missing"},
      {"image": "bad.png", "caption": "corrupt"},
      {"image": "cut.jpg", "caption": "truncated"},
      {"image": "a.png", "caption": "   "},
      "{not json",
      {"caption": "no image key"},
  ]
  text = "\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n\n"
  (tmp_path / "captions.jsonl").write_text(text)
  return tmp_path, files


def test_captions_folder(caption_folder, tmp_path):
  folder, files = caption_folder
  importer = make_importer("captions", captions=str(folder / "captions.jsonl"))
  summary = write(importer, tmp_path / "out", "caption")
  assert summary["documents"] == {"train": 3}
  assert summary["skipped"] == {"missing_image": 1, "bad_image": 2, "empty": 1, "unparsable": 2}
  docs = {d.segments[1]: d for d in read_source(tmp_path / "out" / "caption")}
  assert set(docs) == {"a red square", "a blue square", "a green square"}
  # PNG and JPEG are stored as they were; other formats are re-encoded as PNG, same pixels.
  assert docs["a red square"].segments[0].encoded == files["a.png"]
  assert docs["a blue square"].segments[0].encoded == files["sub/b.jpg"]
  bmp = docs["a green square"].segments[0]
  assert bmp.encoded[:4] == b"\x89PNG" and (bmp.height, bmp.width) == (10, 12)
  assert (bmp.decode() == np.array(Image.open(io.BytesIO(files["c.bmp"])))).all()
  assert docs["a red square"].meta == {"id": 1} and docs["a red square"].source == "caption"
  manifest = json.loads((tmp_path / "out" / "caption" / conversion.MANIFEST).read_text())
  assert manifest["skipped"] == summary["skipped"] and manifest["schema_version"] == 1
  assert any("nope.png" in e for e in manifest["skip_examples"])


def test_parallel_writing_gives_the_same_shards(caption_folder, tmp_path):
  folder, _ = caption_folder
  importer = make_importer("captions", captions=str(folder / "captions.jsonl"))
  write(importer, tmp_path / "serial", "caption", eval_fraction=0.3)
  write(importer, tmp_path / "parallel", "caption", eval_fraction=0.3, workers=2)
  names = sorted(f for f in os.listdir(tmp_path / "serial" / "caption") if "array_record" in f)
  assert names == ["eval-00000-of-00001.array_record", "train-00000-of-00002.array_record",
                   "train-00001-of-00002.array_record"]
  for name in names:
    assert ((tmp_path / "serial" / "caption" / name).read_bytes()
            == (tmp_path / "parallel" / "caption" / name).read_bytes()), name


def test_interleaved_jsonl_both_forms(tmp_path):
  (tmp_path / "x.png").write_bytes(image_bytes("PNG", "red"))
  (tmp_path / "y.jpg").write_bytes(image_bytes("JPEG", "blue"))
  lines = [
      {"texts": ["first", None, "between", None, "last"],
       "images": [None, "x.png", None, "y.jpg", None], "url": "u"},
      {"segments": [{"image": "y.jpg"}, {"text": "after"}, {"text": ""}]},
      {"texts": ["a", None], "images": [None]},                      # unequal lists
      {"texts": ["a", None], "images": ["x.png", None]},             # both set at 0, none at 1
      {"segments": [{"image": "https://example.com/z.jpg"}, {"text": "t"}]},
      {"segments": [{"image": "x.png"}]},                            # no text
  ]
  (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(l) for l in lines))
  importer = make_importer("interleaved", documents=str(tmp_path / "docs.jsonl"))
  summary = write(importer, tmp_path / "out", "interleaved")
  assert summary["documents"] == {"train": 2} and summary["images"] == 3
  assert summary["skipped"] == {"unparsable": 2, "missing_image": 1, "empty": 1}
  docs = sorted(read_source(tmp_path / "out" / "interleaved"), key=lambda d: len(d.segments))
  kinds = [["img" if isinstance(s, ImageSegment) else s for s in d.segments] for d in docs]
  assert kinds == [["img", "after"], ["first", "img", "between", "img", "last"]]
  assert docs[1].meta == {"url": "u"}
  assert docs[1].segments[1].encoded == (tmp_path / "x.png").read_bytes()


def _tar(path, members: dict, mode="w"):
  with tarfile.open(path, mode) as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("suffix,mode", [(".tar", "w"), (".tar.gz", "w:gz")])
def test_webdataset_tar(tmp_path, suffix, mode):
  jpg, png = image_bytes("JPEG", "red"), image_bytes("PNG", "blue")
  _tar(tmp_path / f"shard-0{suffix}", {
      "d/000.jpg": jpg, "d/000.txt": b"a red square",
      "d/001.png": png, "d/001.json": json.dumps({"caption": "a blue square", "w": 12}).encode(),
      "d/002.png": png,                                   # no caption
      "d/003.jpg": b"garbage", "d/003.txt": b"broken",
  }, mode)
  _tar(tmp_path / f"shard-1{suffix}", {"e/004.jpg": jpg, "e/004.txt": b"  "}, mode)
  importer = make_importer("webdataset", shards=[str(tmp_path / f"shard-*{suffix}")])
  summary = write(importer, tmp_path / "out", "caption")
  assert summary["documents"] == {"train": 2}
  assert summary["skipped"] == {"incomplete": 1, "bad_image": 1, "empty": 1}
  docs = {d.segments[1]: d for d in read_source(tmp_path / "out" / "caption")}
  assert docs["a red square"].segments[0].encoded == jpg
  assert docs["a blue square"].segments[0].encoded == png
  assert docs["a blue square"].meta == {"key": "d/001", "w": 12}


def test_tfds_data_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  pngs = [image_bytes("PNG", (40 * i, 0, 0)) for i in range(5)]

  class ToyCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(), "meta": {"caption": tfds.features.Text()}}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, png in enumerate(pngs):
        yield i, {"image": io.BytesIO(png), "meta": {"caption": "" if i == 4 else f"red {i}"}}

  ToyCaptions(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
  importer = make_importer("tfds", name="toy_captions", data_dir=str(tmp_path / "tfds"))
  assert (importer.image_key, importer.text_key) == ("image", "meta/caption")
  summary = write(importer, tmp_path / "out", "toy", workers=2)
  assert summary["documents"] == {"train": 4} and summary["skipped"] == {"empty": 1}
  docs = {d.segments[1]: d for d in read_source(tmp_path / "out" / "toy")}
  assert set(docs) == {f"red {i}" for i in range(4)}
  for i in range(4):  # the stored PNG bytes, not a re-encoding
    assert docs[f"red {i}"].segments[0].encoded == pngs[i]
  with pytest.raises(FileNotFoundError, match="not prepared"):
    make_importer("tfds", name="no_such_dataset", data_dir=str(tmp_path / "tfds"))


def test_sklearn_digits(tmp_path):
  pytest.importorskip("sklearn")
  importer = make_importer("sklearn-digits", image_size=16)
  summary = write(importer, tmp_path / "out", "digits", eval_fraction=0.1, workers=2)
  assert summary["documents"] == {"train": 1617, "eval": 180} and summary["skipped"] == {}
  docs = read_source(tmp_path / "out" / "digits")
  names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
  for doc in docs[::97]:
    image, caption = doc.segments
    assert caption == f"a handwritten digit {names[doc.meta['digit']]}"
    pixels = image.decode()
    assert pixels.shape == (16, 16, 3) and pixels.min() < 100 < 200 < pixels.max()


class CrashingImporter:
  """Fails with an unexpected error half way: a bug, not bad input."""

  def items(self):
    return list(range(50))

  def convert(self, item):
    if item == 25:
      raise RuntimeError("importer bug")
    return (f"text {item}",), {}


class TextImporter(CrashingImporter):
  def convert(self, item):
    return (f"text {item}",), {}


def test_existing_output_is_kept_until_a_write_completes(tmp_path):
  write(TextImporter(), tmp_path, "text")
  before = {f: (tmp_path / "text" / f).read_bytes() for f in os.listdir(tmp_path / "text")}
  with pytest.raises(FileExistsError, match="--overwrite"):
    write(TextImporter(), tmp_path, "text")
  with pytest.raises(RuntimeError, match="importer bug"):
    write(CrashingImporter(), tmp_path, "text", overwrite=True)
  after = {f: (tmp_path / "text" / f).read_bytes() for f in os.listdir(tmp_path / "text")}
  assert after == before
  assert os.listdir(tmp_path) == ["text"]  # no staging folder left behind
