"""Metrics to DIR/metrics.jsonl and TensorBoard (DIR/tb/); only process 0 writes."""
import json
import os

import jax


class MetricsWriter:
  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # imported here: other processes never need it
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._drop_steps_after(resume_step)
    self.tb = SummaryWriter(os.path.join(workdir, "tb"))

  def _drop_steps_after(self, step: int):
    """A resumed run recomputes the steps after its checkpoint: drop their old records so the file
    holds one record per step, from the run that the checkpoints continue."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in metrics.items():
      self.tb.add_scalar(key, float(value), int(step))

  def close(self):
    if self.enabled:
      self.tb.close()
