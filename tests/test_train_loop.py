"""The loop end to end: loss falls, outputs are written, and stopping never changes the result.

The resume test runs the real command in subprocesses: one is killed (SIGKILL) mid-run, the next
resumes and is stopped with SIGTERM, a last one finishes; every step's loss must equal, bit for
bit, an uninterrupted run's (data included: the iterator state is in the checkpoint).
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import tiny_config
from nmm_jax.train.loop import train_and_evaluate

ROOT = os.path.join(os.path.dirname(__file__), "..")
STEPS = 20


def _cli(workdir, data_dir, *extra):
  return [sys.executable, "-m", "nmm_jax.train", "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--config.train.steps={STEPS}", f"--config.data.dir={data_dir}",
          *extra]


def _read_metrics(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _wait_for(predicate, proc, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f"training exited early with {proc.returncode}:\n"
                           + proc.stderr.read().decode()[-3000:])
    time.sleep(0.05)
  proc.kill()
  raise AssertionError("timed out waiting for the training process")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, shapes_data_dir):
  workdir = str(tmp_path_factory.mktemp("straight"))
  records = train_and_evaluate(tiny_config(**{"train.steps": STEPS, "data.dir": shapes_data_dir,
                                              "train.profile_steps": (3, 4)}), workdir)
  return workdir, {r["step"]: r for r in records}


def test_loss_falls(straight_run):
  _, by_step = straight_run
  assert by_step[1]["loss"] > 4.0  # about ln(vocab) at init
  assert by_step[STEPS]["loss"] < by_step[1]["loss"] - 2.0
  assert by_step[STEPS]["eval/loss"] < by_step[15]["eval/loss"]  # eval every 15 in tiny
  for source in ("caption", "interleaved", "text"):
    assert by_step[STEPS][f"eval/loss/{source}"] < by_step[1][f"loss/{source}"]


def test_outputs_written(straight_run):
  workdir, by_step = straight_run
  records = _read_metrics(workdir)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # log_every=1 in tiny
  for key in ("loss", "lr", "tokens_per_s", "mfu", "grad_norm", "loss/caption",
              "loss/interleaved", "loss/text", "data/packing_efficiency", "data/wait_fraction"):
    assert key in records[-1], key
  assert 0 < records[-1]["mfu"] < 1
  assert glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
  # train.profile_steps=(3, 4): one jax.profiler trace, readable by TensorBoard's profile tab.
  assert len(glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*",
                                    "*.xplane.pb"))) == 1
  for part in ("state", "data", "config"):
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "20", part)), part


def test_metrics_writer_leaves_torch_alone(tmp_path):
  """tensorboardX imports torch when it can (2 s of every run's start, for torch tensors the
  run never logs): the writer is imported without it, and still writes its events."""
  script = ("import sys; from nmm_jax.train.metrics import MetricsWriter; "
            f"w = MetricsWriter({str(tmp_path)!r}); w.write(1, {{'loss': 2.5}}); w.close(); "
            "print('torch' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "False"
  (events,) = glob.glob(os.path.join(tmp_path, "tb", "events.out.tfevents.*"))
  from tensorboardX.proto.event_pb2 import Event
  with open(events, "rb") as f:
    data, scalars = f.read(), {}
  while data:  # TFRecord frames: length (8 bytes), its CRC (4), the event, the event's CRC (4)
    length = int.from_bytes(data[:8], "little")
    event = Event.FromString(data[12:12 + length])
    scalars.update({(event.step, v.tag): v.simple_value for v in event.summary.value})
    data = data[16 + length:]
  assert scalars == {(1, "loss"): 2.5}


def test_resume_with_another_worker_count_fails_clearly(tmp_path, straight_run,
                                                       shapes_data_dir):
  import shutil

  from nmm_jax.config import ConfigError
  workdir = str(tmp_path / "run")
  shutil.copytree(straight_run[0], workdir)
  config = tiny_config(**{"train.steps": STEPS + 5, "data.dir": shapes_data_dir,
                          "data.num_workers": 1})
  with pytest.raises(ConfigError, match="data.num_workers: is 1 but the checkpoint"):
    train_and_evaluate(config, workdir)


def test_kill_and_sigterm_resume_exactly(tmp_path, straight_run, shapes_data_dir):
  _, straight = straight_run
  workdir = str(tmp_path / "interrupted")
  env = dict(os.environ, PYTHONUNBUFFERED="1")

  # 1. Killed without warning after the step-10 checkpoint has been committed.
  first = subprocess.Popen(_cli(workdir, shapes_data_dir), cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  committed = os.path.join(workdir, "checkpoints", "10", "commit_success.txt")
  _wait_for(lambda: os.path.exists(committed) and len(_read_metrics(workdir)) >= 11, first)
  first.send_signal(signal.SIGKILL)
  first.wait()
  killed_at = _read_metrics(workdir)[-1]["step"]

  # 2. The same command resumes from step 10; SIGTERM makes it save and exit 0.
  second = subprocess.Popen(_cli(workdir, shapes_data_dir), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  # A step past `killed_at` can only have been logged by this second process.
  _wait_for(lambda: _read_metrics(workdir)[-1]["step"] > max(killed_at, 11), second)
  second.send_signal(signal.SIGTERM)
  assert second.wait(timeout=120) == 0, second.stderr.read().decode()[-3000:]
  stopped_at = _read_metrics(workdir)[-1]["step"]
  assert 12 <= stopped_at < STEPS, "stopped too late to test a SIGTERM resume"
  assert str(stopped_at) in os.listdir(os.path.join(workdir, "checkpoints"))

  # 3. And again, to the end.
  third = subprocess.run(_cli(workdir, shapes_data_dir), cwd=ROOT, env=env,
                         capture_output=True, timeout=300)
  assert third.returncode == 0, third.stderr.decode()[-3000:]

  resumed = _read_metrics(workdir)
  assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
  for record in resumed:
    assert record["loss"] == straight[record["step"]]["loss"], record["step"]
    assert record["grad_norm"] == straight[record["step"]]["grad_norm"], record["step"]
  assert resumed[-1]["eval/loss"] == straight[STEPS]["eval/loss"]


def test_bfloat16_trains_like_float32(straight_run, shapes_data_dir, tmp_path):
  """bf16 compute through the real train step (f32 parameters and moments): the loss falls and
  ends within a few percent of the f32 run's."""
  _, f32 = straight_run
  records = train_and_evaluate(tiny_config(**{"train.steps": STEPS, "data.dir": shapes_data_dir,
                                               "model.dtype": "bfloat16"}), str(tmp_path))
  bf16 = {r["step"]: r for r in records}
  assert bf16[STEPS]["loss"] < 0.5 * bf16[1]["loss"]
  assert abs(bf16[STEPS]["loss"] - f32[STEPS]["loss"]) < 0.03 * f32[STEPS]["loss"]
  assert abs(bf16[STEPS]["eval/loss"] - f32[STEPS]["eval/loss"]) < 0.03 * f32[STEPS]["eval/loss"]


def test_compilation_cache_under_the_workdir_unless_one_is_set(straight_run, tmp_path):
  """train.compilation_cache: by default WORKDIR/compile_cache; "" off; a cache already
  configured (here the suite's, JAX_COMPILATION_CACHE_DIR) wins. JAX writes the compiled
  programs there on the CPU too: the suite's cache holds the straight run's."""
  import jax

  from nmm_jax.train.loop import use_compilation_cache
  assert os.listdir(os.environ["JAX_COMPILATION_CACHE_DIR"])
  suite_cache = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    use_compilation_cache(tiny_config(**{"train.compilation_cache": ""}), str(tmp_path))
    assert jax.config.jax_compilation_cache_dir is None
    use_compilation_cache(tiny_config(), str(tmp_path))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "compile_cache")
    use_compilation_cache(tiny_config(**{"train.compilation_cache": "/shared/cache"}),
                          str(tmp_path))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "compile_cache")
  finally:
    jax.config.update("jax_compilation_cache_dir", suite_cache)


def test_bfloat16_step_keeps_float32_parameters_and_moments():
  """model.dtype=bfloat16 computes in bf16, but the step's new parameters and AdamW moments stay
  f32 (the master copy), over an FSDP mesh."""
  import jax
  import jax.numpy as jnp

  from nmm_jax import config as config_lib
  from nmm_jax import sharding
  from nmm_jax.data import pipeline
  from nmm_jax.train import program as program_lib
  config = tiny_config(**{"model.dtype": "bfloat16", "mesh.data": 2, "mesh.fsdp": 4})
  mesh = sharding.make_mesh(config_lib.validate(config, 8), jax.devices()[:8])
  program = program_lib.build(config, mesh, len(pipeline.source_names(config)))
  new_state, _ = program_lib.lower_train_step(program, config, 8).out_info
  floats = [x for x in jax.tree.leaves(new_state["params"]) + jax.tree.leaves(
      new_state["opt_state"]) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert len(floats) > 10 and all(x.dtype == jnp.float32 for x in floats)
