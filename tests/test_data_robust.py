"""Bad input never stops training: bad records and shards are skipped, counted and logged."""
import json
import os
import shutil

import msgpack
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from conftest import assert_resumes_exactly, tiny_config
from nmm_jax.data import pipeline, synthetic, writer
from nmm_jax.data.records import Document, ImageSegment, encode_document

GOOD_DOCS = 24
EXPECTED_SKIPS = {"unparsable": 2, "bad_image": 1, "empty": 1, "unreadable_shard": 1}


def _write(path, raws):
  w = ArrayRecordWriter(path, "group_size:1")
  for raw in raws:
    w.write(raw)
  w.close()


@pytest.fixture(scope="module")
def dirty_data_dir(tmp_path_factory, shapes_data_dir):
  """One source, both splits: good caption documents with every kind of bad record mixed in,
  and a shard that is not an ArrayRecord file at all."""
  root = tmp_path_factory.mktemp("dirty")
  shutil.copy(os.path.join(shapes_data_dir, writer.TOKENIZER_FILE), root)
  good = [encode_document(d) for d in synthetic.generate_documents("caption", GOOD_DOCS, 16, 5)]
  bad = [
      b"\x00 not msgpack at all",
      msgpack.packb({"v": 99, "segments": []}),  # a schema this code does not know
      encode_document(Document("caption", (ImageSegment(b"not a png", 16, 16), "one red circle"))),
      encode_document(Document("caption", ("",))),
  ]
  raws = good[:10] + bad[:2] + good[10:17] + bad[2:] + good[17:]
  os.makedirs(root / "caption")
  for split in ("train", "eval"):
    _write(str(root / "caption" / f"{split}-00000-of-00002.array_record"), raws)
    (root / "caption" / f"{split}-00001-of-00002.array_record").write_bytes(b"garbage" * 10)
  return str(root)


def test_one_pass_skips_and_counts_each_bad_record(dirty_data_dir):
  config = tiny_config(**{"data.mixture": {"caption": 1.0}})
  documents, last_skipped = 0, None
  for batch in pipeline.make_dataset(config, dirty_data_dir, "eval", seed=0):
    last_skipped = batch.pop("skipped")
    starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
    documents += int(starts.sum())
  assert documents == GOOD_DOCS  # every good document arrives, once
  assert last_skipped == EXPECTED_SKIPS


def test_skip_counts_resume_with_the_iterator(dirty_data_dir):
  config = tiny_config(**{"data.mixture": {"caption": 1.0}, "train.batch_size": 2})
  got = assert_resumes_exactly(
      lambda: pipeline.make_dataset(config, dirty_data_dir, "train", seed=0), (3, 5, 4))
  assert got[-1]["skipped"]["unparsable"] >= 2  # the run went through bad records


def test_training_runs_through_bad_records(dirty_data_dir, tmp_path):
  from nmm_jax.train.loop import train_and_evaluate
  config = tiny_config(**{"data.dir": dirty_data_dir, "data.mixture": {"caption": 1.0},
                          "train.steps": 4, "train.warmup_steps": 1, "eval.every_steps": 4})
  records = train_and_evaluate(config, str(tmp_path))
  last = records[-1]
  assert last["step"] == 4 and np.isfinite(last["loss"])
  for reason in EXPECTED_SKIPS:
    assert last[f"data/skipped/{reason}"] >= EXPECTED_SKIPS[reason], reason
  with open(tmp_path / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  assert "data/skipped/unparsable" in logged[-1] and "data/packing_efficiency" in logged[-1]


def test_source_with_no_readable_shard_fails_at_start(tmp_path, shapes_data_dir):
  shutil.copy(os.path.join(shapes_data_dir, writer.TOKENIZER_FILE), tmp_path)
  os.makedirs(tmp_path / "caption")
  (tmp_path / "caption" / "train-00000-of-00001.array_record").write_bytes(b"garbage")
  config = tiny_config(**{"data.mixture": {"caption": 1.0}})
  with pytest.raises(FileNotFoundError, match="none of its 1 train shards"):
    pipeline.make_dataset(config, str(tmp_path), "train", seed=0)


def test_skip_counts_of_worker_processes_are_summed():
  """With data.num_workers each worker counts its own slice; the batches report the sum of
  every worker's latest counts."""
  from nmm_jax.data.stages import SkipTally
  tally = SkipTally()
  reports = [((0, 0), {"empty": 1}), ((0, 1), {"bad_image": 2}), ((0, 0), {"empty": 3}),
             ((0, 1), {"bad_image": 2})]
  sums = [tally({"skipped": [r]})["skipped"] for r in reports]
  assert sums == [{"empty": 1}, {"empty": 1, "bad_image": 2}, {"empty": 3, "bad_image": 2},
                  {"empty": 3, "bad_image": 2}]
