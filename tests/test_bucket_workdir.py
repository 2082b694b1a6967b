"""A run whose workdir and data are in a bucket, against a real GCS server on 127.0.0.1.

The server is gcp-storage-emulator (PyPI), started by tests/gcs_emulator.py with the one response
header it lacks and TensorStore needs (that file says which). Each library reaches it through its
own documented endpoint setting; no code of ours stands in for it: TensorStore (Orbax's
checkpoints) through TENSORSTORE_GCS_HTTP_URL with GOOGLE_AUTH_TOKEN_FOR_TESTING; gcsfs
(etils.epath: metrics.jsonl, the data iterator state, data.dir, TensorBoard events, the profiler
trace) through STORAGE_EMULATOR_HOST. gcsfs's probe of a bucket's storage layout goes to the
storage-control API, which the emulator does not serve, so it is off here
(GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false); real buckets get it.

A run trains in the bucket in-process; the same command in subprocesses is stopped by SIGTERM and
resumed; every step's loss must equal the uninterrupted run's, bit for bit.
"""
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import tiny_config

# Not imported here: gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT when first imported.
for _package in ("gcsfs", "gcp_storage_emulator"):
  if importlib.util.find_spec(_package) is None:
    pytest.skip(f"{_package} is not installed (the test extra has it)", allow_module_level=True)

ROOT = os.path.join(os.path.dirname(__file__), "..")
BUCKET = "nmm-test"
STEPS = 30  # tiny: checkpoints every 10, eval at 15 and 30


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  """The emulator's URL; the environment points every client library at it meanwhile."""
  port = _free_port()
  log = open(tmp_path_factory.mktemp("emulator") / "log.txt", "wb")
  server = subprocess.Popen(
      [sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator.py"), str(port),
       BUCKET], stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
      break
    except OSError:
      if server.poll() is not None or time.time() > deadline:
        raise AssertionError(f"the GCS emulator did not start (exit {server.poll()})")
      time.sleep(0.1)
  url = f"http://127.0.0.1:{port}"
  settings = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
              "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
              "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  saved = {k: os.environ.get(k) for k in settings}
  os.environ.update(settings)
  _forget_clients()
  try:
    yield url
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    _forget_clients()
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _forget_clients():
  """fsspec keeps one gcsfs client per setting: a new one must read the new endpoint."""
  import gcsfs
  gcsfs.GCSFileSystem.clear_instance_cache()


def _fresh(uri: str):
  """epath.Path(uri) after dropping gcsfs's cached listings (another process wrote there)."""
  import fsspec

  from nmm_jax import storage
  fsspec.filesystem("gs").invalidate_cache()
  return storage.path(uri)


@pytest.fixture(scope="module")
def bucket_data(emulator, shapes_data_dir):
  from nmm_jax import storage
  uri = f"gs://{BUCKET}/data"
  storage.upload(shapes_data_dir, uri)
  return uri


def _config_values(data_uri, cache_dir):
  return {"train.steps": STEPS, "data.dir": data_uri, "data.cache_dir": str(cache_dir)}


@pytest.fixture(scope="module")
def straight_run(bucket_data, tmp_path_factory):
  from nmm_jax.train.loop import train_and_evaluate
  cache = tmp_path_factory.mktemp("cache")
  workdir = f"gs://{BUCKET}/straight"
  records = train_and_evaluate(tiny_config(**_config_values(bucket_data, cache),
                                           **{"train.profile_steps": (3, 4)}), workdir)
  return workdir, {r["step"]: r for r in records}, cache


def test_outputs_are_in_the_bucket(straight_run, bucket_data, shapes_data_dir):
  from nmm_jax import storage
  workdir, by_step, cache = straight_run
  records = storage.read_jsonl(f"{workdir}/metrics.jsonl")
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  assert [r["loss"] for r in records] == [by_step[s]["loss"] for s in range(1, STEPS + 1)]
  root = _fresh(workdir)
  assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["10", "20", "30"]
  for part in ("state", "data", "config", "commit_success.txt"):
    assert (root / "checkpoints" / "30" / part).exists(), part
  assert list((root / "tb").glob("events.out.tfevents.*"))
  assert list((root / "profile").glob("plugins/profile/*/*.xplane.pb"))
  # data.dir was read from a local copy, file for file what is in the bucket.
  copy = storage.copy_location(bucket_data, str(cache))
  for folder, _, names in os.walk(shapes_data_dir):
    for name in names:
      relative = os.path.relpath(os.path.join(folder, name), shapes_data_dir)
      with open(os.path.join(folder, name), "rb") as f:
        assert open(os.path.join(copy, relative), "rb").read() == f.read(), relative


def test_checkpoints_verify_from_the_bucket(straight_run):
  workdir = straight_run[0]
  result = subprocess.run([sys.executable, "-m", "nmm_jax.checkpoint_cli", "verify",
                           f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  for step in ("10", "20", "30"):
    assert step in result.stdout


def test_sigterm_and_resume_in_the_bucket_exactly(straight_run, bucket_data, tmp_path):
  from nmm_jax import storage
  _, straight, _ = straight_run
  workdir = f"gs://{BUCKET}/interrupted"
  command = [sys.executable, "-m", "nmm_jax.train", "--config=configs/tiny.py",
             f"--workdir={workdir}",
             *(f"--config.{k}={v}" for k, v in _config_values(bucket_data, tmp_path).items())]
  env = dict(os.environ, PYTHONUNBUFFERED="1")

  first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
  committed = f"{workdir}/checkpoints/10/commit_success.txt"
  deadline = time.time() + 300
  while not _fresh(committed).exists():
    if first.poll() is not None:
      raise AssertionError(f"training exited early with {first.returncode}:\n"
                           + first.stderr.read().decode()[-3000:])
    assert time.time() < deadline, "timed out waiting for the step-10 checkpoint"
    time.sleep(0.2)
  first.send_signal(signal.SIGTERM)
  assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-3000:]
  saved = sorted(int(p.name) for p in (_fresh(workdir) / "checkpoints").iterdir())
  assert saved[0] == 10 and saved[-1] < STEPS, f"stopped too late to test a resume: {saved}"
  logged = storage.read_jsonl(f"{workdir}/metrics.jsonl")
  assert logged and logged[-1]["step"] == saved[-1]  # flushed before the SIGTERM save

  second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=300)
  assert second.returncode == 0, second.stderr.decode()[-3000:]
  resumed = storage.read_jsonl(f"{workdir}/metrics.jsonl")
  assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
  for record in resumed:
    assert record["loss"] == straight[record["step"]]["loss"], record["step"]
    assert record["grad_norm"] == straight[record["step"]]["grad_norm"], record["step"]
  assert resumed[-1]["eval/loss"] == straight[STEPS]["eval/loss"]


def test_bucket_data_is_copied_once_and_again_when_it_changes(emulator, tmp_path):
  from nmm_jax import storage
  source = tmp_path / "source"
  (source / "caption").mkdir(parents=True)
  (source / "caption" / "train-00000-of-00001.array_record").write_bytes(b"\x01" * 1000)
  (source / "tokenizer.json").write_text("{}")
  uri = f"gs://{BUCKET}/copied"
  storage.upload(str(source), uri)
  cache = str(tmp_path / "cache")

  copy = storage.local_copy(uri, cache, progress=False)
  assert copy == storage.copy_location(uri, cache)
  shard = os.path.join(copy, "caption", "train-00000-of-00001.array_record")
  assert open(shard, "rb").read() == b"\x01" * 1000
  tokenizer = os.path.join(copy, "tokenizer.json")
  first = os.stat(tokenizer).st_mtime_ns
  time.sleep(0.01)
  storage.local_copy(uri, cache, progress=False)
  assert os.stat(tokenizer).st_mtime_ns == first  # unchanged in the bucket: not copied again

  (source / "tokenizer.json").write_text('{"changed": true}')
  storage.upload(str(source), uri)
  storage.local_copy(uri, cache, progress=False)
  assert open(tokenizer).read() == '{"changed": true}'
  single = storage.local_copy(f"{uri}/tokenizer.json", str(tmp_path / "one"), progress=False)
  assert open(single).read() == '{"changed": true}'

  with pytest.raises(FileNotFoundError, match=f"gs://{BUCKET}/nowhere does not exist"):
    storage.local_copy(f"gs://{BUCKET}/nowhere", cache)


def test_unknown_schemes_are_refused_by_name():
  from nmm_jax import storage
  with pytest.raises(ValueError, match=r"ftp://host/run: unsupported scheme ftp://"):
    storage.path("ftp://host/run")
