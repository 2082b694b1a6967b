"""nmm-eval captions: greedy captions of the held-out shapes pictures, scored per attribute.

  nmm-eval captions --workdir=DIR [--step=N] [--num=300] [--source=caption] [--show=5]

Prints one JSON object: accuracy per attribute (colour, shape, count, region) and for all four,
chance per attribute, the number of pictures, and the first --show captions beside the truth.
Needs documents that carry the shapes generator's attributes (the embedded data).
"""
from absl import flags

from nmm_jax.eval import captions
from nmm_jax.eval.cli.common import FLAGS, load, report

flags.DEFINE_string("source", "caption", "Source whose eval shards hold the pictures.")
flags.DEFINE_integer("max_new_tokens", 12, "Caption length limit.")
flags.DEFINE_integer("show", 5, "Captions to print beside the truth.")


def main(argv):
  del argv
  model, examples = load(FLAGS.source)
  examples = captions.with_attributes(examples)
  if not examples:
    raise ValueError(f"no {FLAGS.source} eval document carries shape attributes: caption "
                     f"accuracy needs the embedded shapes data")
  result = captions.caption_accuracy(model, examples, max_new_tokens=FLAGS.max_new_tokens,
                                     batch_size=FLAGS.batch_size)
  report({"step": model.step, "pictures": len(examples), "accuracy": result.accuracy,
          "chance": captions.CHANCE,
          "examples": [{"generated": g, "truth": t} for g, t in result.captions[:FLAGS.show]]})
