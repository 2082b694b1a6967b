"""Damaged checkpoints: a truncated or deleted file in the latest checkpoint costs one interval
(the same command resumes from the step before, bit-identical to the uninterrupted run, and
the bad step is kept aside); checkpoint.restore_step; `nmm-checkpoints verify`; a save that
cannot be written stops the run with one clear error and leaves the earlier steps usable."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import tiny_config
from nmm_jax.checkpoint import UnreadableCheckpoint
from nmm_jax.config import ConfigError
from nmm_jax.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def _config(data_dir, **overrides):
  return tiny_config(**{"train.steps": STEPS, "data.dir": data_dir, "eval.every_steps": 100,
                        "checkpoint.every_steps": 2, "checkpoint.async_save": True,
                        **overrides})


@pytest.fixture(scope="module")
def straight(shapes_data_dir, tmp_path_factory):
  """An uninterrupted run with checkpoints at 2, 4 and 6: (workdir, losses by step)."""
  workdir = tmp_path_factory.mktemp("straight") / "run"
  records = train_and_evaluate(_config(shapes_data_dir), str(workdir))
  return workdir, {r["step"]: r["loss"] for r in records}


def _largest_file(folder):
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
  return max(files, key=os.path.getsize)


def _damaged_copy(straight_dir, tmp_path, damage):
  workdir = tmp_path / "run"
  shutil.copytree(straight_dir, workdir)
  victim = _largest_file(workdir / "checkpoints" / str(STEPS) / "state")
  if damage == "truncate":
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 2)
  else:
    os.remove(victim)
  return workdir


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_latest_checkpoint_costs_one_interval(damage, straight, shapes_data_dir,
                                                        tmp_path):
  straight_dir, losses = straight
  workdir = _damaged_copy(straight_dir, tmp_path, damage)
  records = train_and_evaluate(_config(shapes_data_dir), str(workdir))
  assert [r["step"] for r in records] == [5, 6]
  assert [r["loss"] for r in records] == [losses[5], losses[6]]
  assert records[0]["checkpoint/unreadable_steps"] == 1
  assert "checkpoint/unreadable_steps" not in records[1]
  names = set(os.listdir(workdir / "checkpoints"))
  assert {"2", "4", "6", f"unreadable-{STEPS}"} <= names  # kept aside, a new 6 written

  # The verifier finds the new step 6 sound and ignores the one set aside.
  out = subprocess.run([sys.executable, "-m", "nmm_jax.checkpoint_cli", "verify",
                        f"--workdir={workdir}"], capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "3 sound, 0 unreadable" in out.stdout, out.stdout


def test_verify_names_the_damaged_step(straight, tmp_path):
  workdir = _damaged_copy(straight[0], tmp_path, "truncate")
  out = subprocess.run([sys.executable, "-m", "nmm_jax.checkpoint_cli", "verify",
                        f"--workdir={workdir}"], capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL, cwd=ROOT)
  assert out.returncode == 1, out.stdout + out.stderr[-2000:]
  lines = {line.split()[0]: line for line in out.stdout.splitlines()
           if line.split() and line.split()[0].isdigit()}
  assert "sound" in lines["2"] and "sound" in lines["4"]
  assert "UNREADABLE" in lines[str(STEPS)], out.stdout
  assert "2 sound, 1 unreadable" in out.stdout
  assert os.path.isdir(workdir / "checkpoints" / str(STEPS))  # verify moves nothing


def test_restore_step_resumes_from_the_step_asked_for(straight, shapes_data_dir, tmp_path):
  straight_dir, losses = straight
  workdir = tmp_path / "run"
  shutil.copytree(straight_dir, workdir)
  records = train_and_evaluate(_config(shapes_data_dir, **{"checkpoint.restore_step": 2}),
                               str(workdir))
  assert [r["step"] for r in records] == [3, 4, 5, 6]
  assert [r["loss"] for r in records] == [losses[s] for s in (3, 4, 5, 6)]
  assert {"superseded-4", "superseded-6", "2", "4", "6"} <= set(os.listdir(workdir /
                                                                          "checkpoints"))
  with pytest.raises(ConfigError, match=r"checkpoint.restore_step.*no checkpoint at step 3"):
    train_and_evaluate(_config(shapes_data_dir, **{"checkpoint.restore_step": 3}),
                       str(workdir))


def test_an_unreadable_restore_step_is_an_error_not_a_fallback(straight, shapes_data_dir,
                                                               tmp_path):
  workdir = _damaged_copy(straight[0], tmp_path, "delete")
  with pytest.raises(UnreadableCheckpoint, match=f"step {STEPS}.*unreadable"):
    train_and_evaluate(_config(shapes_data_dir, **{"checkpoint.restore_step": STEPS}),
                       str(workdir))
  assert os.path.isdir(workdir / "checkpoints" / str(STEPS))  # asked for: left in place


_FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    sys.path.insert(0, "tests")
    import conftest
    from conftest import tiny_config
    from nmm_jax.checkpoint import CheckpointSaveError
    from nmm_jax.train import loop

    # Files may not grow past 64 KiB once the first checkpoint is written: what a full disk
    # does to the next save (EFBIG instead of ENOSPC; SIGXFSZ ignored so the write fails).
    real_save = loop.Checkpointer.save
    def save(self, step, *args):
      real_save(self, step, *args)
      if step == 2:
        self.wait()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
    loop.Checkpointer.save = save
    config = tiny_config(**{"train.steps": 6, "data.dir": sys.argv[1], "eval.every_steps": 100,
                            "checkpoint.every_steps": 2})
    try:
      loop.train_and_evaluate(config, sys.argv[2])
    except CheckpointSaveError as e:
      print("SAVE FAILED:", e)
      sys.exit(3)
""")


def test_a_save_that_cannot_be_written_stops_the_run_cleanly(shapes_data_dir, tmp_path):
  workdir = tmp_path / "run"
  out = subprocess.run([sys.executable, "-c", _FULL_DISK, shapes_data_dir, str(workdir)],
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                       cwd=ROOT)
  assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-3000:]
  message = out.stdout.split("SAVE FAILED:", 1)[1]
  assert "checkpoint save at step 4" in message and "step 2 is intact" in message, message
  # Step 2 still restores: the same command (without the limit) resumes from it.
  records = train_and_evaluate(_config(shapes_data_dir, **{"checkpoint.async_save": False}),
                               str(workdir))
  assert records[0]["step"] == 3
