"""Flags and loading shared by the nmm-eval commands."""
import json

from absl import flags

from nmm_jax.eval import held_out
from nmm_jax.eval.run_model import load_run

flags.DEFINE_string("workdir", None, "The training run's folder (holds checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("data_dir", "", "Shard folder (default: the run's data.dir or WORKDIR/data).")
flags.DEFINE_integer("num", 0, "Held-out pairs to use, in shard order (0: all).")
flags.DEFINE_integer("batch_size", 64, "Rows per model call.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def load(source: str):
  """(the run's model, held-out caption pairs of `source`)."""
  model = load_run(FLAGS.workdir, FLAGS.step)
  examples = held_out.run_caption_examples(model.config, FLAGS.workdir, source, model.image_size,
                                           data_dir=FLAGS.data_dir, limit=FLAGS.num)
  return model, examples


def report(result: dict):
  print(json.dumps(result, indent=1))
