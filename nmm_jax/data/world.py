"""The embedded "world" dataset: data with depth, for scaling studies (data.synthetic.kind).

The shapes data (synthetic.py) is learnt to its entropy floor within a few thousand tiny steps,
so a sweep on it measures nothing. Here the loss keeps falling with parameters and tokens for the
reason it does on real data: most of what there is to learn is a long, Zipf-distributed tail of
facts. A world of K named creatures is drawn once from the seed:

  * a name of two syllables (128 syllables: K <= 16,384 names), one token each;
  * a colour, a home and a food (8 values each), and a friend (another creature);
  * a portrait: a 4x4 glyph of its colour on black, a code unique to it (image -> name is a
    lookup a model must learn, through its image front end);
  * a popularity: creature k of the ranking is picked with probability ~ (k+1)^-zipf.

A bigger model holds more of the tail (the N term), more tokens show more of it often enough
(the D term); the popular head is learnt early, so the loss bends down over decades.

Three sources, as in the paper's mixture:
  caption      a portrait, "this is <name> ." and one or two facts about it
  interleaved  two or three numbered portraits with their names, then which picture one of them
               was (a reference back across the document) and a fact about it
  text         a story: a creature, then 3-6 facts; after "<x> is friends with <y> ." the story
               follows y (every later name is a copy from context)

Every random choice that the text reveals (and the images do not) is drawn through `Choices`,
which adds its information. A document's `meta["entropy"]` is the negative log-probability of its
text given its images under the generator, in nats: no model can do better on average, so the
token-weighted mean over held-out documents is the dataset's entropy floor (`entropy_floor`).
"""
import dataclasses
import functools
import json
import math
import os

import numpy as np

from nmm_jax.data.records import Document, encode_png

SOURCES = ("caption", "interleaved", "text")
_CONSONANTS = "b d f g h j k l m n p r s t v z".split()
_VOWELS = "a e i o u ai ou ei".split()
SYLLABLES = tuple(c + v for c in _CONSONANTS for v in _VOWELS)   # 128
COLOURS = {"red": (220, 50, 50), "green": (50, 190, 70), "blue": (60, 90, 230),
           "yellow": (235, 215, 50), "white": (240, 240, 240), "orange": (240, 140, 30),
           "purple": (150, 60, 200), "pink": (245, 130, 190)}
HOMES = ("north", "south", "east", "west", "hills", "forest", "river", "lake")
FOODS = ("fish", "bread", "rice", "fruit", "seeds", "honey", "grass", "nuts")
RELATIONS = ("colour", "home", "food", "friend")
NUMBERS = ("zero", "one", "two", "three")
GLYPH = 4               # the portrait is GLYPH x GLYPH cells
MAX_ENTITIES = len(SYLLABLES) ** 2

VOCABULARY = tuple(dict.fromkeys(
    SYLLABLES + tuple(COLOURS) + HOMES + FOODS + NUMBERS[1:]
    + tuple("this is lives in the eats friends with picture was : .".split())))
# No syllable is also a word: a name's tokens never read as a sentence's.
assert len(VOCABULARY) == len(SYLLABLES) + len(COLOURS) + len(HOMES) + len(FOODS) + 3 + 12


@dataclasses.dataclass(frozen=True)
class World:
  """The creatures and their facts; index = popularity rank (0 most often picked)."""
  names: tuple            # "ba kou"
  colour: np.ndarray      # [K] index into COLOURS
  home: np.ndarray        # [K]
  food: np.ndarray        # [K]
  friend: np.ndarray      # [K] another creature
  glyph: np.ndarray       # [K, GLYPH, GLYPH] bool, distinct non-empty codes
  popularity: np.ndarray  # [K] probabilities, ~ (rank+1)^-zipf

  @property
  def size(self) -> int:
    return len(self.names)

  def fact(self, entity: int, relation: str) -> str:
    """The sentence stating `relation` of `entity` (its subject first)."""
    name = self.names[entity]
    if relation == "colour":
      return f"{name} is {list(COLOURS)[self.colour[entity]]} ."
    if relation == "home":
      return f"{name} lives in the {HOMES[self.home[entity]]} ."
    if relation == "food":
      return f"{name} eats {FOODS[self.food[entity]]} ."
    return f"{name} is friends with {self.names[self.friend[entity]]} ."

  def portrait(self, entity: int, size: int) -> np.ndarray:
    """[size, size, 3] uint8: the glyph's cells in the creature's colour, on black."""
    if size % GLYPH:
      raise ValueError(f"world portraits need data.image_size divisible by {GLYPH}, got {size}")
    colour = np.array(list(COLOURS.values())[self.colour[entity]], np.uint8)
    cells = np.kron(self.glyph[entity], np.ones((size // GLYPH, size // GLYPH), bool))
    return np.where(cells[..., None], colour, np.uint8(0)).astype(np.uint8)

  def entropy_of_a_pick(self) -> float:
    """Nats of one popularity-weighted pick of a creature."""
    p = self.popularity
    return float(-(p * np.log(p)).sum())


@functools.lru_cache(maxsize=4)
def make_world(entities: int, zipf: float, seed: int) -> World:
  """Deterministic: the same arguments give the same world on any machine."""
  if not 2 <= entities <= MAX_ENTITIES:
    raise ValueError(f"data.synthetic.entities must be in [2, {MAX_ENTITIES}], got {entities}")
  if zipf < 0:
    raise ValueError(f"data.synthetic.zipf must be >= 0, got {zipf}")
  rng = np.random.default_rng([seed, 7919])
  name_ids = rng.choice(MAX_ENTITIES, size=entities, replace=False)
  names = tuple(f"{SYLLABLES[i // len(SYLLABLES)]} {SYLLABLES[i % len(SYLLABLES)]}"
                for i in name_ids)
  codes = rng.choice(np.arange(1, 2 ** (GLYPH * GLYPH)), size=entities, replace=False)
  glyph = ((codes[:, None] >> np.arange(GLYPH * GLYPH)) & 1).astype(bool)
  weights = (np.arange(entities) + 1.0) ** -zipf
  popularity = weights / weights.sum()
  # A friend is picked by popularity too (popular creatures are everyone's friend), never itself.
  friend = np.searchsorted(np.cumsum(popularity), rng.random(entities) * (1 - 1e-12))
  friend = np.where(friend == np.arange(entities), (friend + 1) % entities, friend)
  return World(names, rng.integers(0, len(COLOURS), entities),
               rng.integers(0, len(HOMES), entities), rng.integers(0, len(FOODS), entities), friend,
               glyph.reshape(entities, GLYPH, GLYPH), popularity)


class Choices:
  """The generator's random choices, with the information the text gets from each (nats)."""

  def __init__(self, rng: np.random.Generator, world: World, portraits: dict):
    self.rng, self.world, self.nats = rng, world, 0.0
    self._cdf = np.cumsum(world.popularity)
    self._portraits = portraits   # (entity, size) -> PNG, shared by a generator's documents

  def portrait(self, entity: int, size: int):
    """The creature's portrait as a PNG image segment (each encoded once)."""
    key = (entity, size)
    if key not in self._portraits:
      self._portraits[key] = encode_png(self.world.portrait(entity, size))
    return self._portraits[key]

  def creature(self, *, seen: bool, exclude=()) -> int:
    """A creature by popularity, none of `exclude`. `seen`: the text reveals which (a story's
    subject); not when an image shows it first (a portrait)."""
    while True:
      entity = int(np.searchsorted(self._cdf, self.rng.random() * self._cdf[-1]))
      if entity not in exclude:
        break
    if seen:
      p = self.world.popularity
      self.nats -= math.log(p[entity] / (1 - p[list(exclude)].sum()))
    return entity

  def uniform(self, options):
    """One of `options`, equally likely, revealed by the text."""
    self.nats += math.log(len(options))
    return options[int(self.rng.integers(len(options)))]

  def ordered_sample(self, options, count: int) -> list:
    """`count` distinct options in random order, revealed by the text."""
    self.nats += math.log(math.perm(len(options), count))
    return [options[i] for i in self.rng.permutation(len(options))[:count]]


def caption_document(c: Choices, size: int) -> Document:
  entity = c.creature(seen=False)
  facts = c.ordered_sample(RELATIONS, c.uniform((1, 2)))
  text = " ".join([f"this is {c.world.names[entity]} ."] + [c.world.fact(entity, r) for r in facts])
  return Document("caption", (c.portrait(entity, size), text),
                  {"entities": [entity], "entropy": c.nats})


def interleaved_document(c: Choices, size: int) -> Document:
  entities = []
  for _ in range(c.uniform((2, 3))):
    entities.append(c.creature(seen=False, exclude=entities))
  segments = []
  for i, entity in enumerate(entities):
    segments += [f"picture {NUMBERS[i + 1]} :", c.portrait(entity, size),
                 f"this is {c.world.names[entity]} ."]
  which = c.uniform(range(len(entities)))
  relation = c.uniform(RELATIONS)
  segments.append(f"{c.world.names[entities[which]]} was picture {NUMBERS[which + 1]} . "
                  + c.world.fact(entities[which], relation))
  return Document("interleaved", tuple(segments), {"entities": entities, "entropy": c.nats})


def text_document(c: Choices, size: int) -> Document:
  del size
  subject = c.creature(seen=True)
  entities, sentences = [subject], []
  for _ in range(c.uniform((3, 4, 5, 6))):
    relation = c.uniform(RELATIONS)
    sentences.append(c.world.fact(subject, relation))
    if relation == "friend":
      subject = int(c.world.friend[subject])
      entities.append(subject)
  return Document("text", (" ".join(sentences),), {"entities": entities, "entropy": c.nats})


MAKERS = {"caption": caption_document, "interleaved": interleaved_document,
          "text": text_document}


def generate_documents(source: str, count: int, image_size: int, seed: int, *,
                       entities: int, zipf: float):
  """Deterministic: the same arguments give the same documents on any machine. The world
  depends on (entities, zipf, seed) only, so every source and split describes the same one."""
  world = make_world(entities, zipf, seed)
  rng = np.random.default_rng([seed, SOURCES.index(source)])
  portraits = {}
  return [MAKERS[source](Choices(rng, world, portraits), image_size) for _ in range(count)]


def scored_tokens(doc: Document) -> int:
  """The targets the loss scores in this document: its words and <eos> (features.py scores
  text targets; image markers and patches are not)."""
  return sum(len(s.split()) for s in doc.segments if isinstance(s, str)) + 1


ENTROPY_FILE = "entropy.json"


def source_entropy(docs) -> dict:
  """A source's held-out documents summed: their entropy (nats) and scored tokens."""
  return {"documents": len(docs), "nats": float(sum(d.meta["entropy"] for d in docs)),
          "scored_tokens": int(sum(scored_tokens(d) for d in docs))}


def write_entropy_file(docs_by_source: dict, path: str):
  """ENTROPY_FILE beside the shards: each source's held-out entropy (`source_entropy`)."""
  with open(path, "w") as f:
    json.dump({s: source_entropy(docs) for s, docs in sorted(docs_by_source.items())}, f,
              indent=1)


def read_entropy_file(directory: str) -> dict | None:
  """The data folder's ENTROPY_FILE, or None (not world data)."""
  path = os.path.join(directory, ENTROPY_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def entropy_floor(per_source: dict, mixture: dict) -> dict:
  """The generator's entropy per scored token, in nats, from `source_entropy` summaries: per
  source, and over the mixture (documents drawn in proportion to its weights, as the pipeline
  mixes them). {"loss": floor, "loss/<source>": floor, ...} for the sources with weight > 0."""
  floors, nats, tokens = {}, 0.0, 0.0
  for source, weight in sorted(mixture.items()):
    if not weight:
      continue
    summary = per_source[source]
    h = summary["nats"] / summary["documents"]
    t = summary["scored_tokens"] / summary["documents"]
    floors[f"loss/{source}"] = h / t
    nats += weight * h
    tokens += weight * t
  return {"loss": nats / tokens, **floors}
