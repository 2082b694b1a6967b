"""Caption accuracy on the embedded shapes data: does the model see what is in the picture?

Each held-out picture of the `caption` source is captioned by greedy decoding; the caption is
parsed for the four attributes the generator drew (colour, shape kind, count, region) and each
is compared with the truth in the document's meta. A caption that does not state an attribute
gets it wrong. Chance is 1/5 for colour, 1/3 for shape and count, 1/4 for region.
"""
import dataclasses

from nmm_jax.data import synthetic

ATTRIBUTES = ("colour", "shape", "count", "region")
CHANCE = {"colour": 1 / len(synthetic.COLOURS), "shape": 1 / len(synthetic.SHAPES),
          "count": 1 / synthetic.MAX_COUNT, "region": 1 / len(synthetic.REGIONS)}
_SHAPE_OF_WORD = {**{s: s for s in synthetic.SHAPES},
                  **{plural: s for s, plural in synthetic.PLURAL.items()}}


def parse_caption(text: str) -> dict:
  """{attribute: the first value the caption states, or None}."""
  found = dict.fromkeys(ATTRIBUTES)
  for word in text.split():
    if found["count"] is None and word in synthetic.NUMBERS:
      found["count"] = synthetic.NUMBERS.index(word)
    elif found["colour"] is None and word in synthetic.COLOURS:
      found["colour"] = word
    elif found["shape"] is None and word in _SHAPE_OF_WORD:
      found["shape"] = _SHAPE_OF_WORD[word]
    elif found["region"] is None and word in synthetic.REGIONS:
      found["region"] = word
  return found


def with_attributes(examples) -> list:
  """The examples whose documents carry the generator's attributes (one picture each)."""
  return [e for e in examples if len(e.meta.get("attributes", ())) == 1]


@dataclasses.dataclass
class CaptionResult:
  accuracy: dict      # attribute -> fraction right; "all": every attribute right
  captions: list      # (generated, truth) per example


def caption_accuracy(model, examples, *, max_new_tokens: int = 12,
                     batch_size: int = 0) -> CaptionResult:
  """Greedy captions of `examples` (held_out.CaptionExample with attributes) by `model`
  (inference.InferenceModel), scored per attribute."""
  if not examples:
    raise ValueError("no held-out pictures with attributes to caption")
  generated = model.generate([model.sequence(e.image[None]) for e in examples], max_new_tokens,
                             batch_size=batch_size)
  right = dict.fromkeys(ATTRIBUTES + ("all",), 0)
  for example, out in zip(examples, generated):
    truth, parsed = example.meta["attributes"][0], parse_caption(out.text)
    correct = [parsed[a] == truth[a] for a in ATTRIBUTES]
    for a, ok in zip(ATTRIBUTES, correct):
      right[a] += ok
    right["all"] += all(correct)
  return CaptionResult({a: n / len(examples) for a, n in right.items()},
                       [(out.text, e.caption) for e, out in zip(examples, generated)])
