"""The imperative shell: mesh, model, optimizer, data, checkpoints, the step loop, logging, eval.

It composes a run, so it sits above eval/ and export/: the evaluators come as a list from
eval/training.py (the loop knows none by name), a Hugging Face start from export/hf.py.

Stopping (SIGTERM) saves a checkpoint and returns; running the same command again resumes from
the latest checkpoint, data-iterator position included.
"""
import functools
import os
import signal
import time

import jax
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from nmm_jax import config as config_lib
from nmm_jax import sharding, storage
from nmm_jax.checkpoint import Checkpointer
from nmm_jax.data import pipeline, shards
from nmm_jax.eval.training import training_evaluators
from nmm_jax.export import hf
from nmm_jax.train import program as program_lib
from nmm_jax.train import state as state_lib
from nmm_jax.train.device_prefetch import DevicePrefetch
from nmm_jax.train.loss import losses_from_sums
from nmm_jax.train.metrics import MetricsWriter, StepWindow, format_record, step_record


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


class _StepProfiler:
  """A jax.profiler trace of steps first..last (train.profile_steps) into `directory`. A bucket
  folder gets the trace after it is written: the profiler writes local files only."""

  def __init__(self, steps, directory: str):
    self.first, self.last = tuple(steps) or (0, -1)
    self.directory, self.running = directory, False

  def before(self, step: int):
    if step == self.first:
      self.folder = storage.StagedFolder(self.directory, prefix="nmm-profile-")
      jax.profiler.start_trace(self.folder.local)
      self.running = True

  def after(self, step: int, metrics):
    if self.running and step == self.last:
      jax.block_until_ready(metrics)  # the traced steps' device work, not only their dispatch
      self.close()

  def close(self):
    if self.running:
      jax.profiler.stop_trace()
      self.running = False
      self.folder.close()


def held_out_loss(eval_step, params, config, directory, batch_sh, source_names) -> dict:
  """{"eval/loss": ..., "eval/loss/<source>": ...} over `eval.num_batches` eval batches."""
  total = None
  dataset = pipeline.make_dataset(config, directory, "eval", seed=config.train.seed)
  for i, batch in enumerate(dataset):
    if i == config.eval.num_batches:
      break
    batch.pop("skipped")
    sums = eval_step(params, sharding.place_batch(batch, batch_sh))
    total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
  return losses_from_sums(jax.device_get(total), source_names, prefix="eval/")


def train_and_evaluate(config, workdir: str, devices=None) -> list[dict]:
  """Runs (or resumes) training; returns the logged metric records of this invocation.

  `devices` (default: all) is the set the mesh is built over.
  """
  devices = jax.devices() if devices is None else devices
  mesh_shape = config_lib.validate(config, len(devices), jax.process_count())
  hf.check_init_from(config)
  use_compilation_cache(config, workdir)
  stop = _StopRequest()  # first: a SIGTERM during start-up must not kill the process either
  try:
    return _train(config, workdir, devices, mesh_shape, stop)
  finally:
    stop.restore()


def use_compilation_cache(config, workdir: str):
  """Points JAX's persistent compilation cache at train.compilation_cache (see config.py)."""
  if jax.config.jax_compilation_cache_dir or not config.train.compilation_cache:
    return
  cache = config.train.compilation_cache
  if not (os.path.isabs(cache) or storage.is_remote(cache)):
    cache = storage.join(workdir, cache)
  jax.config.update("jax_compilation_cache_dir", cache)


def _train(config, workdir, devices, mesh_shape, stop) -> list[dict]:
  mesh = sharding.make_mesh(mesh_shape, devices, config_lib.dcn_shape(config.mesh))
  directory = shards.ensure_data_dir(config, workdir)
  tokenizer = _checked_tokenizer(config, directory)
  source_names = pipeline.source_names(config)
  program = program_lib.build(config, mesh, len(source_names))
  checkpointer = Checkpointer(workdir, keep=config.checkpoint.keep,
                              async_save=config.checkpoint.async_save)
  # Checkpoints save (and restore) the wrapper's state: the position of the next batch a step
  # consumes, not of the batches already placed ahead of it.
  data_iter = DevicePrefetch(
      iter(pipeline.make_dataset(config, directory, "train", seed=config.train.seed)),
      functools.partial(sharding.place_batch, shardings=program.batch_shardings),
      depth=config.train.device_prefetch)
  start_step, state, unreadable = _initial_state(config, workdir, program, checkpointer,
                                                 data_iter)
  evaluators = training_evaluators(config, directory, tokenizer, mesh)
  window = StepWindow(config, len(devices))
  writer = MetricsWriter(workdir, resume_step=start_step)
  records, is_main = [], jax.process_index() == 0
  progress = tqdm(total=config.train.steps, initial=start_step, disable=not is_main,
                  desc="train", unit="step", dynamic_ncols=True)
  step = last_saved = start_step
  profiler = _StepProfiler(config.train.profile_steps, storage.join(workdir, "profile"))
  try:
    while step < config.train.steps and not stop.requested:
      profiler.before(step + 1)
      with window.waiting_for_data():  # the pull and the placement of the batch(es) ahead
        host_batch, batch = next(data_iter)
      skipped = host_batch.pop("skipped")  # left on the host by DevicePrefetch
      window.add_step(host_batch)
      state, metrics = program.train_step(state, batch)
      step += 1
      profiler.after(step, metrics)
      progress.update(1)
      eval_now = step % config.eval.every_steps == 0 or step == config.train.steps
      if eval_now or step % config.train.log_every == 0:
        record = step_record(jax.device_get(metrics), skipped, source_names, window, step)
        if unreadable:  # once: the checkpoints this start moved aside
          record["checkpoint/unreadable_steps"], unreadable = len(unreadable), []
        if eval_now:
          record.update(held_out_loss(program.eval_step, state["params"], config, directory,
                                      program.batch_shardings, source_names))
          for evaluator in evaluators:
            record.update(evaluator(state["params"]))
        writer.write(step, record)
        records.append({"step": step, **record})
        progress.set_postfix(loss=f"{record['loss']:.3f}")
        if is_main:
          progress.write(format_record(step, record))
      if step % config.checkpoint.every_steps == 0 or step == config.train.steps:
        writer.flush()  # the records of the steps this checkpoint holds are never lost
        checkpointer.save(step, state, data_iter, config)
        last_saved = step
      if stop.at(step):
        break
    if stop.requested:
      if step > last_saved:
        writer.flush()
        checkpointer.save(step, state, data_iter, config)
      logging.warning("SIGTERM: checkpoint at step %d saved, stopping", step)
    elif is_main and step == config.train.steps:
      for summary in filter(None, (evaluator.summary() for evaluator in evaluators)):
        progress.write(summary)
  finally:
    profiler.close()
    progress.close()
    checkpointer.close()
    writer.close()
    # Stops the prefetch thread and the Grain worker processes (and frees their shared memory)
    # now, not whenever the garbage collector gets to them.
    data_iter.close()
  return records


def _checked_tokenizer(config, directory):
  tokenizer = shards.load_tokenizer(config, directory)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise config_lib.ConfigError(
        f"config.model.vocab_size: {config.model.vocab_size} is smaller than the tokenizer's "
        f"{tokenizer.vocab_size} entries ({tokenizer.path})")
  return tokenizer


def _initial_state(config, workdir, program, checkpointer, data_iter):
  """(step, state, unreadable steps moved aside): the newest readable checkpoint (data iterator
  restored too) or, with none, fresh parameters at step 0, with the text decoder from
  train.init_from_hf when it is set."""
  t0 = time.perf_counter()
  step, state, unreadable = checkpointer.restore_newest_readable(
      program.abstract_state(), data_iter, config,
      check_saved=lambda saved: config_lib.check_resumable(saved, config))
  if unreadable:
    logging.error("%d unreadable checkpoint(s) (steps %s) moved aside in %.1f s; %s",
                  len(unreadable), unreadable, time.perf_counter() - t0,
                  f"resuming from step {step}" if step else "no readable checkpoint is left: "
                  "starting from step 0")
  if step:
    logging.warning("Resumed from the checkpoint at step %d in %s", step, workdir)
    return step, state, unreadable
  state = program.create_state(config)
  if config.train.init_from_hf:
    _, decoder = hf.import_folder(config.train.init_from_hf)
    state = state_lib.set_params(state, decoder, program.state_shardings)
    logging.warning("Text decoder initialised from %s", config.train.init_from_hf)
  return 0, state, unreadable
