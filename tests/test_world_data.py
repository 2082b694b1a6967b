"""The embedded world data (data/world.py): deterministic, true to its world, and its entropy
bookkeeping equal to the entropy of the text it generates."""
import collections
import math
import os

import numpy as np
import pytest

from conftest import tiny_config
from nmm_jax import config as config_lib
from nmm_jax.data import shards, world, writer
from nmm_jax.data.tokenizer import UNK_TOKEN, load_tokenizer

SMALL = dict(entities=4, zipf=1.0)


def _texts(doc) -> str:
  return " ".join(s for s in doc.segments if isinstance(s, str))


def test_documents_are_deterministic_and_describe_one_world():
  a = world.generate_documents("text", 50, 16, 3, entities=500, zipf=1.1)
  b = world.generate_documents("text", 50, 16, 3, entities=500, zipf=1.1)
  assert [d.segments for d in a] == [d.segments for d in b]
  assert [d.meta for d in a] == [d.meta for d in b]
  w = world.make_world(500, 1.1, 3)
  assert len(set(w.names)) == 500 and len({g.tobytes() for g in w.glyph}) == 500
  assert (w.friend != np.arange(500)).all() and w.glyph.reshape(500, -1).any(axis=1).all()
  by_name = {name: i for i, name in enumerate(w.names)}
  checked = 0
  for source in world.SOURCES:
    for doc in world.generate_documents(source, 200, 16, 3, entities=500, zipf=1.1):
      for sentence in _texts(doc).replace(" :", " :.").split(" ."):
        words = sentence.split()
        if len(words) < 3 or " ".join(words[:2]) not in by_name or words[2] == "was":
          continue
        # Every sentence about a creature states one of its own facts.
        e = by_name[" ".join(words[:2])]
        assert f"{sentence.strip()} ." in [w.fact(e, r) for r in world.RELATIONS], sentence
        checked += 1
  assert checked > 500


def test_portraits_show_the_glyph_in_the_creatures_colour():
  w = world.make_world(64, 1.0, 5)
  doc = world.generate_documents("caption", 1, 16, 5, entities=64, zipf=1.0)[0]
  entity = doc.meta["entities"][0]
  pixels = doc.segments[0].decode()
  cells = pixels[::4, ::4].any(axis=-1)          # one pixel of each 4x4 cell
  np.testing.assert_array_equal(cells, w.glyph[entity])
  colour = list(world.COLOURS.values())[w.colour[entity]]
  assert (pixels[cells.repeat(4, 0).repeat(4, 1)] == colour).all()
  assert _texts(doc).startswith(f"this is {w.names[entity]} .")


@pytest.mark.parametrize("source", ["caption", "interleaved"])
def test_entropy_is_that_of_the_text_given_the_images(source):
  # A 4-creature world has few texts per picture: their empirical conditional entropy is the
  # generator's within sampling error.
  docs = world.generate_documents(source, 40_000, 16, 9, **SMALL)
  by_images = collections.defaultdict(collections.Counter)
  for doc in docs:
    by_images[tuple(doc.meta["entities"])][_texts(doc)] += 1
  empirical = 0.0
  for texts in by_images.values():
    n = sum(texts.values())
    empirical += sum(-c * math.log(c / n) for c in texts.values())
  empirical /= len(docs)
  if source == "interleaved":
    # The loss reads text in order: "picture three :" (or the closing sentence) tells the
    # number of pictures before a third image can, so that choice (2 or 3) counts too.
    empirical += math.log(2)
  claimed = np.mean([d.meta["entropy"] for d in docs])
  assert empirical == pytest.approx(claimed, rel=0.01)


def test_entropy_of_a_story_is_its_subject_and_its_choices():
  w = world.make_world(4, 1.0, 9)
  docs = world.generate_documents("text", 20_000, 16, 9, **SMALL)
  for doc in docs[:200]:
    sentences = _texts(doc).count(" .")
    expected = -math.log(w.popularity[doc.meta["entities"][0]]) + math.log(4) * (sentences + 1)
    assert doc.meta["entropy"] == pytest.approx(expected)
  # The text reveals all of it: the empirical entropy of whole stories is the same.
  counts = collections.Counter(_texts(d) for d in docs)
  empirical = sum(-c * math.log(c / len(docs)) for c in counts.values()) / len(docs)
  # 20k samples of a distribution with thousands of outcomes: the plug-in estimate is low.
  assert empirical < np.mean([d.meta["entropy"] for d in docs]) < empirical * 1.25


def test_built_dataset_has_its_tokenizer_and_entropy_floor(tmp_path):
  directory = str(tmp_path / "data")
  writer.build_embedded_dataset(directory, kind="world", train_docs=40, eval_docs=30,
                                image_size=16, seed=2, entities=300, zipf=1.1)
  summary = world.read_entropy_file(directory)
  assert sorted(summary) == list(world.SOURCES)
  tok = load_tokenizer(shards.tokenizer_in(directory))
  assert tok.vocab_size <= 176   # configs/scaling_world.py's vocab_size
  unk = tok.encode(UNK_TOKEN)[0]
  for source in world.SOURCES:
    paths = shards.shard_paths(os.path.join(directory, source), "eval")
    eval_docs = [doc for _, doc in shards.iter_documents(paths)]
    assert len(eval_docs) == 30 == summary[source]["documents"]
    assert summary[source]["nats"] == pytest.approx(sum(d.meta["entropy"] for d in eval_docs))
    for doc in eval_docs:  # every word is a token; the scored count is words + <eos>
      ids = [i for s in doc.segments if isinstance(s, str) for i in tok.encode(s)]
      assert unk not in ids and len(ids) + 1 == world.scored_tokens(doc)
  floor = world.entropy_floor(summary, {"caption": 0.45, "interleaved": 0.45, "text": 0.1})
  h = {s: summary[s]["nats"] / summary[s]["documents"] for s in world.SOURCES}
  t = {s: summary[s]["scored_tokens"] / summary[s]["documents"] for s in world.SOURCES}
  assert floor["loss/text"] == pytest.approx(h["text"] / t["text"])
  w = {"caption": 0.45, "interleaved": 0.45, "text": 0.1}
  assert floor["loss"] == pytest.approx(sum(w[s] * h[s] for s in w) / sum(w[s] * t[s] for s in w))
  assert os.path.exists(os.path.join(directory, writer.COMPLETE_MARKER))


def test_bad_world_settings_name_the_key():
  with pytest.raises(config_lib.ConfigError, match="data.synthetic.kind"):
    config_lib.validate(tiny_config(**{"data.synthetic.kind": "planets"}), 8)
  with pytest.raises(config_lib.ConfigError, match="data.synthetic.entities"):
    config_lib.validate(tiny_config(**{"data.synthetic.kind": "world",
                                       "data.synthetic.entities": 10 ** 6}), 8)
  with pytest.raises(config_lib.ConfigError, match="data.synthetic.zipf"):
    config_lib.validate(tiny_config(**{"data.synthetic.kind": "world",
                                       "data.synthetic.zipf": -1.0}), 8)
