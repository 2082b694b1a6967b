"""Documents -> pieces (splitting long documents), image views, tokenizers."""
import numpy as np
import pytest

from nmm_jax.data import images
from nmm_jax.data import tokenizer as tokenizer_lib
from nmm_jax.data.features import SkipDocument, document_pieces
from nmm_jax.data.records import Document, encode_png

P = 4  # patches per image in these tests: an image span is P + 2 = 6 tokens


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
  tokenizer_lib.word_level_tokenizer([f"w{i}" for i in range(50)], path)
  return tokenizer_lib.load_tokenizer(path)


def _pieces(doc, tok, seq_len, max_images=10):
  return document_pieces(doc, tok, 2, patches_per_image=P, image_size=8, seq_len=seq_len,
                         max_images=max_images,
                         image_view=lambda b: images.eval_view(images.decode(b), 8))


def _image(value):
  return encode_png(np.full((8, 8, 3), value, np.uint8))


def _long_doc():
  words = lambda a, b: " ".join(f"w{i}" for i in range(a, b))
  return Document("interleaved", (words(0, 7), _image(10), words(7, 12), _image(20),
                                  _image(30), words(12, 30)))


@pytest.mark.parametrize("seq_len, max_images", [(100, 10), (11, 10), (8, 10), (40, 1)])
def test_split_never_cuts_an_image_and_predicts_every_target_once(tok, seq_len, max_images):
  doc = _long_doc()
  whole = _pieces(doc, tok, 1000)[0]
  pieces = _pieces(doc, tok, seq_len, max_images)
  assert (len(pieces) == 1) == (seq_len >= len(whole["tokens"]) and max_images >= 3)
  for key in ("tokens", "targets", "loss_mask", "patch_ids", "source"):
    np.testing.assert_array_equal(np.concatenate([p[key] for p in pieces]), whole[key], key)
  for p in pieces:
    assert len(p["tokens"]) <= seq_len and len(p["images"]) <= max_images
    is_image = p["image_ids"] >= 0
    # Every image in a piece is whole: P patches, and its pixels are the right picture.
    for i in range(len(p["images"])):
      assert (p["image_ids"] == i).sum() == P
    assert is_image.sum() == P * len(p["images"])
  values = [int(img[0, 0, 0]) for p in pieces for img in p["images"]]
  assert values == [10, 20, 30]


def test_unusable_documents_raise_with_a_reason(tok):
  with pytest.raises(SkipDocument, match="too_long"):
    _pieces(Document("caption", (_image(1), "w1 w2")), tok, seq_len=5)
  with pytest.raises(SkipDocument, match="empty"):
    _pieces(Document("caption", (_image(1), "")), tok, seq_len=50)


def test_image_views():
  pixels = np.arange(30 * 20 * 3, dtype=np.uint8).reshape(30, 20, 3)
  img = images.decode(encode_png(pixels).encoded)
  out = images.eval_view(img, 10)
  assert out.shape == (10, 10, 3) and out.dtype == np.uint8
  # Train views are a function of the generator: the same seed gives the same crop and flip.
  a = images.train_view(img, 10, np.random.default_rng(3), crop_scale=(0.4, 1), flip_prob=0.5)
  b = images.train_view(img, 10, np.random.default_rng(3), crop_scale=(0.4, 1), flip_prob=0.5)
  np.testing.assert_array_equal(a, b)
  flipped = images.train_view(img, 20, np.random.default_rng(0), crop_scale=(1, 1), flip_prob=1)
  unflipped = images.train_view(img, 20, np.random.default_rng(0), crop_scale=(1, 1),
                                flip_prob=0)
  np.testing.assert_array_equal(flipped, unflipped[:, ::-1])


def test_word_level_tokenizer_is_reproducible(tmp_path, tok):
  for name in ("a.json", "b.json"):
    tokenizer_lib.word_level_tokenizer([f"w{i}" for i in range(50)], str(tmp_path / name))
  assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
  ids = tok.encode("w3 w4 nonsense")
  assert ids[:2] == [tok.encode("w3")[0], tok.encode("w4")[0]]
  assert tok.decode([tok.bos_id] + ids[:2] + [tok.eos_id]) == "w3 w4"
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)


def test_sentencepiece_training_and_loading(tmp_path):
  texts = [f"a picture of {n} {c} {s} on the {r}" for n in ("one", "two", "three")
           for c in ("red", "green", "blue") for s in ("circles", "squares")
           for r in ("left", "right")]
  path = str(tmp_path / "sp.model")
  tokenizer_lib.train_sentencepiece(texts * 5, path, vocab_size=60)
  sp = tokenizer_lib.load_tokenizer(path)
  assert (sp.pad_id, sp.bos_id, sp.eos_id) == (0, 1, 2)
  assert len({sp.image_id, sp.image_start_id, sp.image_end_id}) == 3
  assert sp.decode(sp.encode("two blue squares on the left")) == "two blue squares on the left"


def test_tokenizer_without_image_tokens_is_refused(tmp_path):
  import tokenizers
  from tokenizers import models
  path = str(tmp_path / "plain.json")
  tokenizers.Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")).save(path)
  with pytest.raises(ValueError, match="<bos>"):
    tokenizer_lib.load_tokenizer(path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "missing.model"))
