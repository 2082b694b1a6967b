"""nmm-eval zero-shot: each held-out image classified by the likelihood of candidate captions.

  nmm-eval zero-shot --workdir=DIR --source=digits [--num=0] [--data_dir=DIR]

The candidates are the distinct captions of the source's held-out pairs (digits: "a handwritten
digit zero" .. "nine"). Prints one JSON object: accuracy, chance (1 / candidates), the number of
images, and the accuracy per true caption.
"""
import collections

from absl import flags

from nmm_jax.eval import zero_shot
from nmm_jax.eval.cli.common import FLAGS, load, report

flags.DEFINE_string("source", None, "Source whose eval shards hold the image-caption pairs.")
flags.mark_flags_as_required(["source"])


def main(argv):
  del argv
  model, examples = load(FLAGS.source)
  result = zero_shot.zero_shot_accuracy(model, examples, batch_size=FLAGS.batch_size)
  right, total = collections.Counter(), collections.Counter()
  for predicted, label in zip(result.predictions, result.labels):
    total[label] += 1
    right[label] += predicted == label
  report({"step": model.step, "images": len(examples), "candidates": len(result.candidates),
          "accuracy": result.accuracy, "chance": result.chance,
          "per_caption": {result.candidates[c]: right[c] / total[c] for c in sorted(total)}})
