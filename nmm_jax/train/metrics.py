"""A logged step's record (losses, speed, input figures, router statistics), its console line,
and the writer to DIR/metrics.jsonl and TensorBoard (DIR/tb/); only process 0 writes."""
import contextlib
import json
import sys
import time

import jax
import numpy as np

from nmm_jax import hardware, storage
from nmm_jax.data.stages import sum_over_processes
from nmm_jax.scaling import flops
from nmm_jax.train.loss import losses_from_sums


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch. tensorboardX imports torch whenever
  it is installed, only to accept torch tensors, and that took 2 s of every run's start; the
  run logs floats."""
  mask = "torch" not in sys.modules  # a torch already loaded is left alone
  if mask:
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, as if not installed
  try:
    from tensorboardX import SummaryWriter
  finally:
    if mask:
      del sys.modules["torch"]
  return SummaryWriter


class StepWindow:
  """Speed and input-pipeline figures over the steps since the last logged one."""

  def __init__(self, config, num_devices: int):
    seq_flops = flops.train_flops_per_sequence(config.model, config.data.seq_len,
                                               config.data.max_images)
    self.step_flops = seq_flops * config.train.batch_size
    self.peak_flops = hardware.peak_tflops_per_device(config.model.dtype) * 1e12 * num_devices
    self.tokens_per_step = config.train.batch_size * config.data.seq_len
    self._restart()

  def _restart(self):
    self.start, self.steps, self.padding, self.wait = time.perf_counter(), 0, 0.0, 0.0

  @contextlib.contextmanager
  def waiting_for_data(self):
    """Times the step loop standing still for data (the device keeps computing the previous
    step meanwhile: dispatch is asynchronous)."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self.wait += time.perf_counter() - start

  def add_step(self, host_batch):
    self.steps += 1
    self.padding += float(np.mean(host_batch["segment_ids"] == 0))

  def figures(self) -> dict:
    """Tokens/s, step time, MFU, packing efficiency and wait fraction; starts a new window."""
    window_time = time.perf_counter() - self.start
    step_time = window_time / self.steps
    out = {"tokens_per_s": self.tokens_per_step / step_time, "step_time_s": step_time,
           "mfu": self.step_flops / step_time / self.peak_flops,
           "data/packing_efficiency": 1.0 - self.padding / self.steps,
           "data/wait_fraction": self.wait / window_time}
    self._restart()
    return out


def step_record(metrics, skipped: dict, source_names, window: StepWindow, step: int) -> dict:
  """The record of a logged train step from its (host) metrics and this process's skip counts;
  every process calls it (the skip counts are summed over processes)."""
  record = losses_from_sums(metrics["sums"], source_names)
  skipped = sum_over_processes(skipped)
  if not np.isfinite(record["loss"]):
    raise FloatingPointError(f"loss is {record['loss']} at step {step}")
  record.update(lr=metrics["lr"], grad_norm=metrics["grad_norm"], **window.figures(),
                **{f"data/skipped/{k}": v for k, v in sorted(skipped.items())})
  if "moe" in metrics:
    record.update(router_metrics(metrics["moe"]))
  return record


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


class MetricsWriter:
  """DIR/metrics.jsonl and TensorBoard events in DIR/tb/, DIR local or in a bucket. In a bucket
  both are written to the bucket every `flush_secs` and on `flush` (storage.py)."""

  def __init__(self, workdir: str, *, resume_step: int = 0, flush_secs: float = 30.0):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    SummaryWriter = _summary_writer_class()  # imported here: other processes never need it
    self.log = storage.LineLog(storage.join(workdir, "metrics.jsonl"))
    self._drop_steps_after(resume_step)
    # In a bucket the event file is written locally and uploaded whole on each flush:
    # tensorboardX's own gs:// writer uploads again from __del__, after the run has ended.
    self.tb_folder = storage.StagedFolder(storage.join(workdir, "tb"), prefix="nmm-tb-")
    self.tb = SummaryWriter(self.tb_folder.local, flush_secs=flush_secs)
    self.flush_secs, self._flushed = flush_secs, time.monotonic()

  def _drop_steps_after(self, step: int):
    """A resumed run recomputes the steps after its checkpoint: drop their old records so the file
    holds one record per step, from the run that the checkpoints continue."""
    lines = self.log.read_lines()
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) < len(lines):
      self.log.rewrite(kept)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    self.log.append(json.dumps(record) + "\n")
    for key, value in metrics.items():
      self.tb.add_scalar(key, float(value), int(step))
    if self.log.remote and time.monotonic() - self._flushed >= self.flush_secs:
      self.flush()

  def flush(self):
    """Everything written so far is in the workdir (called before each checkpoint save)."""
    if not self.enabled:
      return
    self.log.flush()
    self.tb.flush()
    self.tb_folder.sync()
    self._flushed = time.monotonic()

  def close(self):
    if self.enabled:
      self.log.flush()
      self.tb.close()
      self.tb_folder.close()


def router_metrics(stats) -> dict:
  """MoE router statistics of one step (numpy, per layer on the leading axis) -> flat metrics:
  aux losses, dropped assignments, load imbalance (max / mean assignments per expert, averaged
  over layers), and per layer the share of image and of text tokens each expert receives."""
  image, text = np.asarray(stats["image_per_expert"]), np.asarray(stats["text_per_expert"])
  total = image + text
  out = {"moe/load_balance": float(np.mean(stats["load_balance"])),
         "moe/z_loss": float(np.mean(stats["z_loss_sum"])
                             / max(float(np.mean(stats["real_tokens"])), 1.0)),
         "moe/dropped": float(np.sum(stats["dropped"])),
         "moe/imbalance": float(np.mean(total.max(-1) / np.maximum(total.mean(-1), 1e-9))),
         # Assignments of image / text tokens per layer (top_k per token): the shares' totals.
         "moe/image_assignments": float(image[0].sum()),
         "moe/text_assignments": float(text[0].sum())}
  for layer in range(total.shape[0]):
    for name, counts in (("image", image[layer]), ("text", text[layer])):
      shares = counts / max(counts.sum(), 1e-9)
      out.update({f"moe/layer{layer}/{name}_share/e{e}": float(v) for e, v in enumerate(shares)})
  return out
