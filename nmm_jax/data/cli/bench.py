"""nmm-data bench: how fast the training pipeline runs, and whether it keeps the step fed.

  nmm-data bench --config=configs/default.py [--workers=0,1,2] [--train_steps=40]

1. Pipeline alone, for each worker count: sequences/s, images/s, text tokens/s.
2. A short training run with the config as given: the fraction of step time the loop waited
   for data (`data/wait_fraction`, also logged by every training run), after the compile.
"""
import tempfile
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from nmm_jax import config as config_lib
from nmm_jax.data import pipeline, shards

config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_list("workers", ["0", "1", "2"], "Worker-process counts to measure.")
flags.DEFINE_integer("batches", 30, "Batches timed per worker count (after 3 warm-up batches).")
flags.DEFINE_integer("train_steps", 40, "Steps of the training run (0: skip it).")
flags.DEFINE_string("workdir", "", "Where the training run writes (default: a temporary folder); "
                    "the embedded data is built under it when data.dir is empty.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def batch_counts(batch) -> tuple:
  """(sequences, images, text targets) in one batch."""
  rows = int(np.sum(np.any(batch["segment_ids"] > 0, axis=1)))
  images = sum(len(np.unique(r[r >= 0])) for r in batch["image_ids"])
  return rows, images, int(batch["loss_mask"].sum())


def pipeline_throughput(config, directory, workers: int, batches: int) -> dict:
  config = config.copy_and_resolve_references()
  config.data.num_workers, config.data.prefetch = workers, 0
  iterator = iter(pipeline.make_dataset(config, directory, "train", seed=config.train.seed))
  try:
    for _ in range(3):  # worker start-up and first fills are not throughput
      next(iterator)
    totals = np.zeros(3)
    start = time.perf_counter()
    for _ in range(batches):
      totals += batch_counts(next(iterator))
    seconds = time.perf_counter() - start
  finally:
    if hasattr(iterator, "close"):
      iterator.close()
  return dict(zip(("sequences_per_s", "images_per_s", "text_tokens_per_s"), totals / seconds))


def training_wait(config, directory, workdir, steps: int) -> dict:
  from nmm_jax.train.loop import train_and_evaluate
  config = config.copy_and_resolve_references()
  config.data.dir = directory
  config.train.steps = steps
  config.train.warmup_steps = min(config.train.warmup_steps, steps)
  config.train.log_every = max(1, min(10, steps // 4))
  config.eval.every_steps = 10 * steps  # no evaluation inside the measured windows
  config.checkpoint.every_steps = 10 * steps
  records = train_and_evaluate(config, tempfile.mkdtemp(prefix="train-", dir=workdir))
  measured = records[1:] or records  # the first window holds the compile
  return {"wait_fraction": float(np.mean([r["data/wait_fraction"] for r in measured])),
          "step_time_s": float(np.mean([r["step_time_s"] for r in measured])),
          "sequences_per_s": config.train.batch_size / float(
              np.mean([r["step_time_s"] for r in measured]))}


def main(argv):
  del argv
  config = FLAGS.config
  import jax
  config_lib.validate(config, jax.device_count(), jax.process_count())
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="nmm-data-bench-")
  directory = shards.ensure_data_dir(config, workdir)
  print(f"data: {directory}")
  print(f"{'workers':>7} {'sequences/s':>12} {'images/s':>9} {'text tokens/s':>14}")
  for workers in (int(w) for w in FLAGS.workers):
    r = pipeline_throughput(config, directory, workers, FLAGS.batches)
    print(f"{workers:>7} {r['sequences_per_s']:>12.1f} {r['images_per_s']:>9.1f} "
          f"{r['text_tokens_per_s']:>14.0f}", flush=True)
  if FLAGS.train_steps:
    r = training_wait(config, directory, workdir, FLAGS.train_steps)
    print(f"training ({FLAGS.train_steps} steps, data.num_workers={config.data.num_workers}, "
          f"data.prefetch={config.data.prefetch}): step {r['step_time_s']:.3f} s, "
          f"consumes {r['sequences_per_s']:.1f} sequences/s, "
          f"data wait {100 * r['wait_fraction']:.1f}% of step time")
