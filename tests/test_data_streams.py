"""Data streams over fewer shards than streams: a source with ONE shard read by 4 streams (or 2
processes) is split by record, not by file, so every stream has records, none is read twice, and
the iterator still resumes exactly."""
import collections
import os
import types

import pytest

from conftest import assert_resumes_exactly, tiny_config
from nmm_jax.data import pipeline, shards, synthetic, writer
from nmm_jax.data import streams as streams_lib
from nmm_jax.data.records import Document
from nmm_jax.data.tokenizer import word_level_tokenizer

STREAMS = 4
# Per source, in one shard each; neither divides by 4, so the streams get unequal shares.
TRAIN_DOCS, EVAL_DOCS = 14, 10
ROWS_PER_STREAM = tiny_config().train.batch_size // STREAMS


def _tagged(index: int, doc: Document) -> Document:
  """`doc` with its record index as two leading words ("one four" = record 14). Packed batches
  carry no record index, and images or short captions repeat across documents; the tag survives
  augmentation and packing, so it names the record exactly."""
  tag = f"{synthetic.NUMBERS[index // 10]} {synthetic.NUMBERS[index % 10]}"
  return Document(doc.source, (tag,) + doc.segments, doc.meta)


@pytest.fixture(scope="module")
def one_shard_dir(tmp_path_factory):
  """The three shapes sources, each with exactly one train shard and one eval shard."""
  root = str(tmp_path_factory.mktemp("one_shard"))
  for source in synthetic.SOURCES:
    docs = synthetic.generate_documents(source, TRAIN_DOCS + EVAL_DOCS, 16, seed=11)
    for split, part in (("train", docs[:TRAIN_DOCS]), ("eval", docs[TRAIN_DOCS:])):
      writer.write_shards([_tagged(i, d) for i, d in enumerate(part)],
                          os.path.join(root, source), split, num_shards=1)
      assert len(shards.shard_paths(os.path.join(root, source), split)) == 1
  word_level_tokenizer(synthetic.VOCABULARY, os.path.join(root, writer.TOKENIZER_FILE))
  return root


def _config(**overrides):
  return tiny_config(**{"data.streams": STREAMS, **overrides})


def _records_by_stream(batch, directory, config, first_stream=0):
  """[(stream, source id, record index)] of every document in `batch`: rows come in stream order,
  ROWS_PER_STREAM each (streams.py); a document starts at position 0 of a real segment and its
  tokens begin <bos> TENS UNITS."""
  tok = shards.load_tokenizer(config, directory)
  digit = {tok.encode(word)[0]: d for d, word in enumerate(synthetic.NUMBERS)}
  out = []
  for row in range(len(batch["tokens"])):
    tokens = batch["tokens"][row]
    for start in ((batch["positions"][row] == 0) & (batch["segment_ids"][row] > 0)).nonzero()[0]:
      assert tokens[start] == tok.bos_id
      index = 10 * digit[tokens[start + 1]] + digit[tokens[start + 2]]
      out.append((first_stream + row // ROWS_PER_STREAM, int(batch["source"][row, start]), index))
  return out


def _eval_records(config, directory):
  records = []
  for batch in pipeline.make_dataset(config, directory, "eval", seed=0):
    records += _records_by_stream(batch, directory, config)
  return records


@pytest.mark.parametrize("source", synthetic.SOURCES)
def test_one_eval_pass_reads_each_record_of_a_one_shard_source_exactly_once(one_shard_dir,
                                                                          source):
  """One source (its eval pass is the whole shard; a mixture stops with its first source to run
  out): stream s reads records s::4, so no stream is empty and every record is read once."""
  config = _config(**{"data.mixture": {source: 1.0}})
  records = _eval_records(config, one_shard_dir)
  assert {src for _, src, _ in records} == {0}
  counts = collections.Counter(index for _, _, index in records)
  assert counts == collections.Counter(range(EVAL_DOCS))  # each record once, none missing
  by_stream = collections.defaultdict(set)
  for stream, _, index in records:
    by_stream[stream].add(index)
  assert {s: sorted(r) for s, r in by_stream.items()} == {
      s: list(range(s, EVAL_DOCS, STREAMS)) for s in range(STREAMS)}


def test_training_streams_split_a_one_shard_mixture_by_record(one_shard_dir):
  """Training (shuffled, endless, three sources): every stream fills its rows, reads only its
  own records s::4 of each source, and over a few epochs reads all of them."""
  config = _config()
  iterator = iter(pipeline.make_dataset(config, one_shard_dir, "train", seed=0))
  by_stream = collections.defaultdict(set)
  for _ in range(12):
    batch = next(iterator)
    for s in range(STREAMS):
      rows = slice(s * ROWS_PER_STREAM, (s + 1) * ROWS_PER_STREAM)
      assert (batch["segment_ids"][rows] > 0).mean() > 0.5, f"stream {s} is (nearly) empty"
    for stream, src, index in _records_by_stream(batch, one_shard_dir, config):
      by_stream[stream].add((src, index))
  for s in range(STREAMS):
    own = {(src, i) for src in range(len(synthetic.SOURCES)) for i in range(s, TRAIN_DOCS, STREAMS)}
    assert by_stream[s] == own, f"stream {s}"


def _as_process(monkeypatch, index: int, count: int):
  """streams.py sees this process as process `index` of `count` (nothing else `make_dataset`
  runs asks JAX about processes)."""
  fake_jax = types.SimpleNamespace(process_index=lambda: index, process_count=lambda: count)
  monkeypatch.setattr(streams_lib, "jax", fake_jax)


def test_two_processes_split_one_shard_by_record(one_shard_dir, monkeypatch):
  """Two processes, two streams each: process p's rows are rows p of the 1-process global batch,
  in eval and in training, so together they read each eval record exactly once."""
  config = _config(**{"data.mixture": {"caption": 1.0}})
  alone = list(pipeline.make_dataset(config, one_shard_dir, "eval", seed=0))
  train = iter(pipeline.make_dataset(config, one_shard_dir, "train", seed=0))
  alone_train = [next(train) for _ in range(3)]
  half = len(alone[0]["tokens"]) // 2
  seen = []
  for p in range(2):
    _as_process(monkeypatch, p, 2)
    assert streams_lib.local_streams(config) == [2 * p, 2 * p + 1]
    mine = list(pipeline.make_dataset(config, one_shard_dir, "eval", seed=0))
    assert len(mine) == len(alone)
    train = iter(pipeline.make_dataset(config, one_shard_dir, "train", seed=0))
    for want, have in zip(alone + alone_train, mine + [next(train) for _ in range(3)]):
      for key in have:
        if key != "skipped":
          assert have[key].tobytes() == want[key][p * half:(p + 1) * half].tobytes(), key
    for batch in mine:
      seen += _records_by_stream(batch, one_shard_dir, config, first_stream=2 * p)
    assert {stream for stream, _, _ in seen if stream >= 2 * p} == {2 * p, 2 * p + 1}
  assert collections.Counter(index for _, _, index in seen) == collections.Counter(
      range(EVAL_DOCS))


def test_four_streams_over_one_shard_resume_exactly(one_shard_dir):
  """Augmentation on, three one-shard sources, 4 streams: stop and restart three times."""
  config = _config(**{"data.augment.crop_scale": (0.4, 1.0), "data.augment.flip_prob": 0.5})
  assert_resumes_exactly(lambda: pipeline.make_dataset(config, one_shard_dir, "train", seed=0))


def test_one_process_state_resumes_under_two_processes(one_shard_dir, monkeypatch):
  """A state saved by one process running the 4 streams, restored by two processes that take
  the states of their own streams (what StreamsCheckpointHandler does): each continues with its
  rows of the uninterrupted batches."""
  config = _config()
  iterator = iter(pipeline.make_dataset(config, one_shard_dir, "train", seed=0))
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(2)]
  half = len(expected[0]["tokens"]) // 2
  for p in range(2):
    _as_process(monkeypatch, p, 2)
    resumed = iter(pipeline.make_dataset(config, one_shard_dir, "train", seed=0))
    resumed.set_state({"streams": {str(s): state["streams"][str(s)]
                                   for s in streams_lib.local_streams(config)}, "exhausted": []})
    for want in expected:
      have = next(resumed)
      for key in have:
        if key != "skipped":
          assert have[key].tobytes() == want[key][p * half:(p + 1) * half].tobytes(), key


def test_more_streams_than_records_fails_by_name(one_shard_dir):
  config = _config(**{"data.streams": 2 * EVAL_DOCS})
  with pytest.raises(ValueError, match=rf"source 'caption' has {EVAL_DOCS} readable eval records"
                                       rf" .* fewer than the {2 * EVAL_DOCS} data streams"):
    pipeline.make_dataset(config, one_shard_dir, "eval", seed=0)
