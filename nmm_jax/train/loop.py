"""The imperative shell: mesh, model, optimizer, data, checkpoints, the step loop, logging, eval.

Stopping (SIGTERM) saves a checkpoint and returns; running the same command again resumes from
the latest checkpoint, data-iterator position included.
"""
import signal
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from nmm_jax import config as config_lib
from nmm_jax import hardware, sharding
from nmm_jax.checkpoint import Checkpointer
from nmm_jax.data import pipeline
from nmm_jax.data.stages import sum_over_processes
from nmm_jax.eval.caption_eval import TrainingCaptionEval
from nmm_jax.scaling import flops
from nmm_jax.train import program as program_lib
from nmm_jax.train import state as state_lib
from nmm_jax.train.loss import losses_from_sums
from nmm_jax.train.metrics import MetricsWriter, router_metrics


class _StopRequest:
  """When to stop for a preemption (SIGTERM), checked between steps.

  One process: our SIGTERM handler sets a flag. Several: JAX's preemption service catches the
  SIGTERM any of them gets and agrees on a step at which every process stops (a Python handler
  here would replace its own), so all save the same step.
  """

  def __init__(self):
    self.requested = False
    self._multi = jax.process_count() > 1
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def at(self, step: int) -> bool:
    """Whether to save and stop after `step` (every process must ask at every step)."""
    if self._multi:
      self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self):
    if not self._multi:
      signal.signal(signal.SIGTERM, self._previous)


def place_batch(batch, shardings):
  """Process-local numpy batch -> global jax arrays in their batch shardings."""
  return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


def evaluate(eval_step, params, config, directory, batch_sh, source_names):
  total = None
  dataset = pipeline.make_dataset(config, directory, "eval", seed=config.train.seed)
  for i, batch in enumerate(dataset):
    if i == config.eval.num_batches:
      break
    batch.pop("skipped")
    sums = eval_step(params, place_batch(batch, batch_sh))
    total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
  return losses_from_sums(jax.device_get(total), source_names, prefix="eval/")


def format_record(step: int, record: dict) -> str:
  def losses(prefix):
    return " ".join(f"{k[len(prefix):]} {v:.3f}" for k, v in record.items()
                    if k.startswith(prefix))
  line = (f"step {step:5d} | loss {record['loss']:.4f} | {losses('loss/')} | "
          f"lr {record['lr']:.2e} | {record['tokens_per_s']:.0f} tok/s | mfu {record['mfu']:.3f}")
  if "eval/loss" in record:
    line += f"\n           | eval loss {record['eval/loss']:.4f} | {losses('eval/loss/')}"
  if "eval/caption/all" in record:
    line += f"\n           | caption accuracy {losses('eval/caption/')}"
  return line


def train_and_evaluate(config, workdir: str, devices=None) -> list[dict]:
  """Runs (or resumes) training; returns the logged metric records of this invocation.

  `devices` (default: all) is the set the mesh is built over.
  """
  devices = jax.devices() if devices is None else devices
  mesh_shape = config_lib.validate(config, len(devices), jax.process_count())
  stop = _StopRequest()  # first: a SIGTERM during start-up must not kill the process either
  try:
    return _train(config, workdir, devices, mesh_shape, stop)
  finally:
    stop.restore()


def _train(config, workdir, devices, mesh_shape, stop) -> list[dict]:
  mesh = sharding.make_mesh(mesh_shape, devices)
  directory = pipeline.data_dir(config, workdir)
  tokenizer = pipeline.load_tokenizer(config, directory)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise config_lib.ConfigError(
        f"config.model.vocab_size: {config.model.vocab_size} is smaller than the tokenizer's "
        f"{tokenizer.vocab_size} entries ({tokenizer.path})")
  source_names = pipeline.source_names(config)

  program = program_lib.build(config, mesh, len(source_names))
  state_sh, batch_sh = program.state_shardings, program.batch_shardings
  state = program.create_state(config)

  checkpointer = Checkpointer(workdir, keep=config.checkpoint.keep,
                              async_save=config.checkpoint.async_save)
  start_step = checkpointer.latest_step() or 0
  if start_step:
    config_lib.check_resumable(checkpointer.saved_config(start_step), config)
  data_iter = iter(pipeline.make_dataset(config, directory, "train", seed=config.train.seed))
  if not start_step and config.train.init_from_hf:
    from nmm_jax.export import hf
    _, decoder = hf.import_folder(config.train.init_from_hf)
    state = state_lib.set_params(state, decoder, state_sh)
    logging.warning("Text decoder initialised from %s", config.train.init_from_hf)
  if start_step:
    state = checkpointer.restore(start_step, program.abstract_state(), data_iter, config)
    logging.warning("Resumed from the checkpoint at step %d in %s", start_step, workdir)

  train_step, eval_step = program.train_step, program.eval_step

  captioner = TrainingCaptionEval.create(config, directory, tokenizer, mesh)

  seq_flops = flops.train_flops_per_sequence(config.model, config.data.seq_len,
                                               config.data.max_images)
  step_flops = seq_flops * config.train.batch_size
  peak_flops = hardware.peak_tflops_per_device(config.model.dtype) * 1e12 * len(devices)
  tokens_per_step = config.train.batch_size * config.data.seq_len

  writer = MetricsWriter(workdir, resume_step=start_step)
  records = []
  is_main = jax.process_index() == 0
  progress = tqdm(total=config.train.steps, initial=start_step, disable=not is_main,
                  desc="train", unit="step", dynamic_ncols=True)
  window_start, window_steps, window_padding, window_wait = time.perf_counter(), 0, 0.0, 0.0
  step = last_saved = start_step
  try:
    while step < config.train.steps and not stop.requested:
      wait_start = time.perf_counter()
      host_batch = next(data_iter)
      # Time the step loop stood waiting for data (the device keeps computing the previous
      # step meanwhile: dispatch is asynchronous).
      window_wait += time.perf_counter() - wait_start
      skipped = host_batch.pop("skipped")
      window_padding += float(np.mean(host_batch["segment_ids"] == 0))
      batch = place_batch(host_batch, batch_sh)
      state, metrics = train_step(state, batch)
      step += 1
      window_steps += 1
      progress.update(1)

      eval_now = step % config.eval.every_steps == 0 or step == config.train.steps
      if eval_now or step % config.train.log_every == 0:
        metrics = jax.device_get(metrics)
        window_time = time.perf_counter() - window_start
        step_time = window_time / window_steps
        record = losses_from_sums(metrics["sums"], source_names)
        skipped = sum_over_processes(skipped)
        if not np.isfinite(record["loss"]):
          raise FloatingPointError(f"loss is {record['loss']} at step {step}")
        record.update(lr=metrics["lr"], grad_norm=metrics["grad_norm"],
                      tokens_per_s=tokens_per_step / step_time, step_time_s=step_time,
                      mfu=step_flops / step_time / peak_flops,
                      **{"data/packing_efficiency": 1.0 - window_padding / window_steps,
                         "data/wait_fraction": window_wait / window_time},
                      **{f"data/skipped/{k}": v for k, v in sorted(skipped.items())})
        if "moe" in metrics:
          record.update(router_metrics(metrics["moe"]))
        if eval_now:
          record.update(evaluate(eval_step, state["params"], config, directory, batch_sh,
                                 source_names))
          if captioner is not None:
            record.update(captioner(state["params"]))
        writer.write(step, record)
        records.append({"step": step, **record})
        progress.set_postfix(loss=f"{record['loss']:.3f}")
        if is_main:
          progress.write(format_record(step, record))
        window_start, window_steps, window_padding, window_wait = time.perf_counter(), 0, 0.0, 0.0

      if step % config.checkpoint.every_steps == 0 or step == config.train.steps:
        checkpointer.save(step, state, data_iter, config)
        last_saved = step
      if stop.at(step):
        break
    if stop.requested:
      if step > last_saved:
        checkpointer.save(step, state, data_iter, config)
      logging.warning("SIGTERM: checkpoint at step %d saved, stopping", step)
    elif is_main and captioner is not None and step == config.train.steps and captioner.shown():
      progress.write(captioner.shown())
  finally:
    progress.close()
    checkpointer.close()
    writer.close()
    # Stops the prefetch thread and the Grain worker processes (and frees their shared memory)
    # now, not whenever the garbage collector gets to them.
    data_iter.close()
  return records
