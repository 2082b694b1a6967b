"""Shards and the Grain pipeline: records round-trip, batches keep the contract, state resumes."""
import numpy as np
import pytest

from conftest import assert_resumes_exactly, load_config, tiny_config
from nmm_jax.data import pipeline, shards, synthetic
from nmm_jax.data.records import ImageSegment, decode_document, encode_document


def test_record_round_trip():
  for source in synthetic.SOURCES:
    for doc in synthetic.generate_documents(source, 3, 16, seed=7):
      back = decode_document(encode_document(doc))
      assert back.source == doc.source and back.meta == doc.meta
      assert len(back.segments) == len(doc.segments)
      for a, b in zip(back.segments, doc.segments):
        if isinstance(a, ImageSegment):
          np.testing.assert_array_equal(a.decode(), b.decode())
        else:
          assert a == b


def test_generation_is_deterministic():
  a = synthetic.generate_documents("interleaved", 5, 16, seed=3)
  b = synthetic.generate_documents("interleaved", 5, 16, seed=3)
  assert [encode_document(d) for d in a] == [encode_document(d) for d in b]


@pytest.fixture(scope="module")
def batches(shapes_data_dir):
  config = tiny_config()
  iterator = iter(pipeline.make_dataset(config, shapes_data_dir, "train", seed=0))
  return config, [next(iterator) for _ in range(4)]


def test_batch_contract(batches, shapes_data_dir):
  config, batch_list = batches
  tok = shards.load_tokenizer(config, shapes_data_dir)
  b, l, i, s = config.train.batch_size, config.data.seq_len, config.data.max_images, 16
  for batch in batch_list:
    for key in ("tokens", "targets", "segment_ids", "positions", "image_ids", "patch_ids",
                "source"):
      assert batch[key].shape == (b, l) and batch[key].dtype == np.int32, key
    assert batch["loss_mask"].shape == (b, l) and batch["loss_mask"].dtype == np.float32
    assert batch["images"].shape == (b, i, s, s, 3) and batch["images"].dtype == np.uint8
    # Inputs and targets are shifted views of one sequence inside each document.
    same_doc = (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]) & (
        batch["segment_ids"][:, 1:] > 0)
    np.testing.assert_array_equal(batch["targets"][:, :-1][same_doc],
                                  batch["tokens"][:, 1:][same_doc])
    # A document's last target is EOS; positions restart at 0 for each document.
    real = batch["segment_ids"] > 0
    doc_end = np.concatenate([~same_doc, np.ones((b, 1), bool)], axis=1) & real
    assert (batch["targets"][doc_end] == tok.eos_id).all()
    starts = np.concatenate([np.ones((b, 1), bool), ~same_doc], axis=1) & (batch["segment_ids"] > 0)
    assert (batch["positions"][starts] == 0).all()
    # The loss scores text targets only.
    np.testing.assert_array_equal(batch["loss_mask"] > 0,
                                  ~np.isin(batch["targets"], tok.non_text_ids))
    # Image positions hold the placeholder and exactly the image ids / patch ids.
    is_image = batch["image_ids"] >= 0
    np.testing.assert_array_equal(is_image, batch["tokens"] == tok.image_id)
    np.testing.assert_array_equal(is_image, batch["patch_ids"] >= 0)
    assert (batch["patch_ids"] < 16).all()
    assert (batch["segment_ids"] > 0).mean() > 0.8  # packing fills the rows


def test_each_image_is_the_one_its_caption_describes(batches, shapes_data_dir):
  """A caption names the colour of its image's shapes: that colour must be in those pixels."""
  config, batch_list = batches
  tok = shards.load_tokenizer(config, shapes_data_dir)
  checked = 0
  for batch in batch_list:
    for row in range(batch["tokens"].shape[0]):
      tokens, image_ids = batch["tokens"][row], batch["image_ids"][row]
      for pos in np.flatnonzero(tokens == tok.image_end_id):
        if pos + 2 >= len(tokens):
          continue
        colour = tok.decode([tokens[pos + 2]])  # "<image_end> NUMBER COLOUR ..."
        pixels = batch["images"][row, image_ids[pos - 1]].reshape(-1, 3).astype(int)
        target = np.array(synthetic.COLOURS[colour])
        assert (np.abs(pixels - target).sum(axis=1) < 60).mean() > 0.02, colour
        checked += 1
  assert checked > 20


def test_iterator_state_resumes_the_exact_stream_over_several_restarts(shapes_data_dir):
  """Stop and restart three times (augmentation on): the batches are byte-identical to those
  of an uninterrupted iterator, skip counts included."""
  config = tiny_config(**{"data.augment.crop_scale": (0.4, 1.0), "data.augment.flip_prob": 0.5})
  assert_resumes_exactly(lambda: pipeline.make_dataset(config, shapes_data_dir, "train", seed=0))


def test_resume_with_worker_processes_is_exact(shapes_data_dir):
  """Two Grain worker processes plus the prefetch thread: the saved state still resumes the
  exact stream."""
  config = tiny_config(**{"data.num_workers": 2, "data.prefetch": 2})
  assert_resumes_exactly(lambda: pipeline.make_dataset(config, shapes_data_dir, "train", seed=0),
                         run_lengths=(3, 2))


def test_missing_source_fails_clearly(shapes_data_dir):
  config = tiny_config(**{"data.mixture": {"caption": 0.5, "video": 0.5}})
  with pytest.raises(FileNotFoundError, match="source 'video'"):
    pipeline.make_dataset(config, shapes_data_dir, "train", seed=0)


def test_missing_data_dir_fails_clearly(tmp_path):
  config = tiny_config(**{"data.dir": str(tmp_path / "nowhere")})
  with pytest.raises(FileNotFoundError, match="config.data.dir"):
    shards.ensure_data_dir(config, str(tmp_path))


def test_realised_mixture_matches_the_weights(shapes_data_dir):
  """Over 3,000 packed sequences (some 10k documents: a share's standard error is under half a
  point), each source's share of documents is within 2 points."""
  config = tiny_config(**{"train.batch_size": 100})
  iterator = iter(pipeline.make_dataset(config, shapes_data_dir, "train", seed=1))
  counts = np.zeros(3)
  for _ in range(30):
    batch = next(iterator)
    starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
    counts += np.bincount(batch["source"][starts], minlength=3)
  names = pipeline.source_names(config)
  weights = np.array([config.data.mixture[n] for n in names])
  np.testing.assert_allclose(counts / counts.sum(), weights / weights.sum(), atol=0.02)


def test_default_mix_packs_at_least_90_percent(tmp_path):
  config = load_config("default")
  config.data.synthetic.update(train_docs=600, eval_docs=10)
  directory = shards.ensure_data_dir(config, str(tmp_path))
  iterator = iter(pipeline.make_dataset(config, directory, "train", seed=0))
  padding = [np.mean(next(iterator)["segment_ids"] == 0) for _ in range(20)]
  assert 1 - np.mean(padding) >= 0.90
