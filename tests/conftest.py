"""Tests run JAX on the CPU with 8 fake devices: every sharding path runs without accelerators."""
import atexit
import os
import shutil
import tempfile

# The suite's programs are tiny: compiling them costs far more than running them, and LLVM's
# optimisation of the CPU code was most of the compile (level 0 cut the CPU time of the training
# and generation tests by a third). Processes the tests start get it too.
FAST_CPU_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_CPU_COMPILE
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
# One persistent compilation cache for the suite and every process it starts: the same tiny
# programs are compiled by many tests and commands. A run's own default cache
# (train.compilation_cache, under its workdir) yields to it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="nmm-tests-compile-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
# Every program, not only those that take a second to compile: a tiny run's evaluation and
# initialisation compile in less, and a repeated training command started 30% sooner with them.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402


def pytest_xdist_make_scheduler(config, log):
  """With -n (xdist's `load`), the tests of a module with a module-scoped fixture (a training
  run, a TPU compile) run on one worker, other tests wherever a worker is free: spread over
  two workers, each built the fixture again. (`--dist loadgroup` would say this with markers,
  but xdist 3.8 cannot rename pytest 9's node ids.)"""
  if config.getoption("dist") != "load":
    return None
  from xdist.scheduler import LoadScopeScheduling
  tests = os.path.dirname(__file__)
  shared = {f"tests/{name}" for name in os.listdir(tests) if name.startswith("test_")
            and 'scope="module"' in open(os.path.join(tests, name)).read()}

  class ModuleFixtureScheduling(LoadScopeScheduling):
    def _split_scope(self, nodeid):
      module = nodeid.split("::", 1)[0]
      return module if module in shared else nodeid
  return ModuleFixtureScheduling(config, log)


def config_module(name: str):
  """The module of configs/NAME.py."""
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"{name}_config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name: str):
  """get_config() of configs/NAME.py."""
  return config_module(name).get_config()


def tiny_config(**overrides):
  """configs/tiny.py with dotted-key overrides, e.g. tiny_config(**{"train.steps": 5})."""
  from nmm_jax.config import with_values
  return with_values(load_config("tiny"), **overrides)


def model_param_count(model_cfg) -> int:
  """Parameters of the real model built from `model_cfg` (shapes only, nothing allocated)."""
  import numpy as np
  from flax import nnx

  from nmm_jax.models import NMM
  abstract = nnx.eval_shape(lambda: NMM(model_cfg, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract)))


def assert_resumes_exactly(make_dataset, run_lengths=(2, 3, 4)):
  """Stops and restarts an iterator of `make_dataset()` after each run length: every batch is
  byte-identical to an uninterrupted iterator's, skip counts included."""
  straight = iter(make_dataset())
  expected = [next(straight) for _ in range(sum(run_lengths) + 1)]
  got, iterator = [], iter(make_dataset())
  for run_length in run_lengths:
    got += [next(iterator) for _ in range(run_length)]
    state = iterator.get_state()
    iterator = iter(make_dataset())  # a new process builds the same pipeline, then restores
    iterator.set_state(state)
  got.append(next(iterator))
  for want, have in zip(expected, got):
    assert have["skipped"] == want["skipped"]
    for key in want:
      if key != "skipped":
        assert have[key].tobytes() == want[key].tobytes(), key
  return got


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
  """The tiny config's embedded shapes shards, built once per test session."""
  from nmm_jax.data import shards
  workdir = tmp_path_factory.mktemp("shared_run")
  return shards.ensure_data_dir(tiny_config(), str(workdir))


assert jax.device_count() == 8, "tests expect 8 fake CPU devices"
