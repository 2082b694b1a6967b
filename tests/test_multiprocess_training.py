"""Multi-process training with real processes on localhost (jax.distributed, gloo on CPU).

One 1-process run (8 devices) is the reference. A 2-process run (4 devices each) of the same
config is stopped by SIGTERM; one process on another mesh resumes it and is stopped; its
checkpoint is damaged, and the next 2-process start falls back to the one before (both
processes agree); then 2 processes on a hybrid mesh (the data axis across the processes, as
across hosts) finish: every step's loss equals the reference's, the processes agree on the
step they stop at, and the caption accuracy of generation over both processes' devices is the
reference's. A process that dies makes the other one exit with an error.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import FAST_CPU_COMPILE

STEPS = 16


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(workdir, data_dir, processes: int, *extra, tag="run"):
  """The training processes of one job (each with 8 / processes CPU devices); process i logs
  to WORKDIR-TAG-pI.log."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = f"{FAST_CPU_COMPILE} --xla_force_host_platform_device_count={8 // processes}"
  base = [sys.executable, "-m", "nmm_jax.train", "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--config.train.steps={STEPS}", "--config.data.streams=2",
          f"--config.data.dir={data_dir}", *extra]
  port = free_port()
  procs = []
  for i in range(processes):
    dist = ([f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
             f"--process_id={i}"] if processes > 1 else [])
    log = open(f"{workdir}-{tag}-p{i}.log", "w")
    procs.append(subprocess.Popen(base + dist, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL))
  return procs


def logged(workdir) -> dict:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {r["step"]: r for r in map(json.loads, f) if r}


def finish(procs, timeout=300) -> list:
  codes = []
  for p in procs:
    codes.append(p.wait(timeout=timeout))
  return codes


def stop_after(procs, workdir, step: int) -> list:
  """SIGTERM to every process once `step` is logged; their exit codes."""
  deadline = time.time() + 300
  while max(logged(workdir), default=0) < step:
    assert time.time() < deadline and all(p.poll() is None for p in procs), "run ended early"
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  return finish(procs)


def checkpoints(workdir) -> list:
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


# Caption accuracy on 8 held-out pictures at each evaluation (steps 15 and 16): generation
# during training runs over every process's devices.
CAPTIONS = ("--config.eval.captions=8",)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shapes_data_dir):
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  assert finish(start(workdir, shapes_data_dir, 1, *CAPTIONS)) == [0]
  return logged(workdir)


def test_two_processes_stop_resume_and_finish_on_other_meshes(reference, shapes_data_dir,
                                                             tmp_path):
  workdir = str(tmp_path / "run")
  # Preempted: both processes get SIGTERM, agree on a step, save it and exit 0.
  assert stop_after(start(workdir, shapes_data_dir, 2, tag="a"), workdir, 3) == [0, 0]
  first_stop = checkpoints(workdir)[-1]
  assert 3 <= first_stop < STEPS
  # One process with 8 devices on an fsdp=2 mesh resumes the 2-process checkpoint (state
  # resharded, both data streams' states read); stopped again.
  assert stop_after(start(workdir, shapes_data_dir, 1, "--config.mesh.fsdp=2", tag="b"),
                    workdir, first_stop + 2) == [0]
  *_, fallback, second_stop = checkpoints(workdir)
  assert first_stop < second_stop < STEPS
  # Its checkpoint is damaged (a state file cut short): both processes of the next start find
  # it unreadable, agree to fall back to the one before it (the first stop's, or the step-10
  # one when the second run got past it before its SIGTERM), and move the bad one aside;
  # stopped again.
  state = os.path.join(workdir, "checkpoints", str(second_stop), "state")
  files = [os.path.join(d, f) for d, _, names in os.walk(state) for f in names]
  victim = max(files, key=os.path.getsize)
  os.truncate(victim, os.path.getsize(victim) // 2)
  procs = start(workdir, shapes_data_dir, 2, tag="b2")
  deadline = time.time() + 300  # (the old records after fallback are there until it starts)
  while "checkpoint/unreadable_steps" not in logged(workdir).get(fallback + 1, {}):
    assert time.time() < deadline and all(p.poll() is None for p in procs), "run ended early"
    time.sleep(0.05)
  assert stop_after(procs, workdir, fallback + 1) == [0, 0]
  assert f"unreadable-{second_stop}" in os.listdir(os.path.join(workdir, "checkpoints"))
  # mesh.dcn_data=2: each process is a granule (a GPU host, as on a cluster), the data axis
  # spans the two over the "data-centre network" and fsdp stays inside each process. It
  # finishes, and evaluates with captions: generation runs over both processes' devices
  # (inputs placed replicated, outputs gathered).
  hybrid = ("--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.mesh.dcn_data=2")
  assert finish(start(workdir, shapes_data_dir, 2, *hybrid, *CAPTIONS, tag="c")) == [0, 0]

  got = logged(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    assert got[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-4), step
  assert got[STEPS]["eval/loss"] == pytest.approx(reference[STEPS]["eval/loss"], rel=1e-4)
  keys = [k for k in reference[STEPS] if k.startswith("eval/caption/")]
  assert sorted(keys) == sorted(f"eval/caption/{a}" for a in
                                ("colour", "shape", "count", "region", "all"))
  assert {k: got[STEPS][k] for k in keys} == {k: reference[STEPS][k] for k in keys}
  # Metrics come from process 0 only: one event file per invocation, not one per process.
  assert len(os.listdir(os.path.join(workdir, "tb"))) == 4


def test_a_dead_process_stops_the_others_with_an_error(shapes_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  procs = start(workdir, shapes_data_dir, 2, "--distributed_timeout=10",
                f"--config.train.steps={10 * STEPS}", tag="fail")
  deadline = time.time() + 300
  while max(logged(workdir), default=0) < 2:
    assert time.time() < deadline and all(p.poll() is None for p in procs), "run ended early"
    time.sleep(0.05)
  procs[1].kill()
  started = time.time()
  code = procs[0].wait(timeout=120)
  assert code != 0 and time.time() - started < 60
  with open(f"{workdir}-fail-p0.log") as f:
    assert "detected fatal errors" in f.read()
