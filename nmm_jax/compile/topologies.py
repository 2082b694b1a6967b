"""Compile-only devices of accelerators that are not attached, by slice name.

TPU: libtpu's compile-only topologies (`jax[tpu]`, in the test extra). H100: the CUDA plugin
(`compile-gpu` extra) with XLA's H100 SXM target description, shipped beside this file (the
values of XLA's gpu_specs/h100_sxm.txtpb). cpu-N: the host's CPU devices (N of them, forced with
XLA_FLAGS before JAX starts: see nmm_jax.compile.__main__).

Slice names follow Cloud TPU's: v4-N and v5p-N count TensorCores (2 per chip: v5p-8 is 4 chips),
v5e-N and v6e-N count chips. libtpu's compile-only v4 devices are single TensorCores (no
megacore), so a v4-N target has N devices of half a chip's HBM each.
"""
import contextlib
import dataclasses
import os
import re
import sys
import tempfile

import jax

GIB = 2 ** 30
# HBM per compile-only device (datasheet: v4 32 GiB per chip = 2 cores, v5e 16, v5p 95, v6e 32).
TPU_GENERATIONS = {
    # name: (libtpu topology prefix, devices per name unit, HBM bytes per device, dims)
    "v4": ("v4", 1, 16 * GIB, 3),
    "v5p": ("v5p", 2, 95 * GIB, 3),
    "v5e": ("v5e", 1, 16 * GIB, 2),
    "v6e": ("v6e", 1, 32 * GIB, 2),
}
H100_CONFIG = os.path.join(os.path.dirname(__file__), "h100_sxm.txtpb")
NAMES = "v4-N, v5p-N, v5e-N, v6e-N (Cloud TPU slice names), h100-8 (-16, ...: hosts of 8), cpu-N"


class TopologyError(ValueError):
  """A topology name that cannot be compiled for here; the message says what to install."""


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  devices: list
  device_kind: str
  hbm_bytes: int      # per device
  platform: str       # "tpu", "cuda" or "cpu"


def chip_grid(chips: int, dims: int) -> str:
  """'2x2x1', '4x4' ...: the slice's chip grid as Cloud TPU shapes grow (v5p 2x2x1, 2x2x2,
  2x2x4, 2x4x4, 4x4x4 ...; v6e 1x1, 2x2, 2x4, 4x4, 4x8 ...): the smallest axis doubles, the
  last of equals first."""
  if chips < 1 or chips & (chips - 1):
    raise TopologyError(f"{chips} chips: slices here are powers of two")
  shape = [1] * dims
  if dims == 3 and chips >= 4:
    shape = [2, 2, 1]
  while _product(shape) < chips:
    smallest = min(shape)
    last = max(i for i, s in enumerate(shape) if s == smallest)
    shape[last] *= 2
  return "x".join(str(s) for s in shape)


def _product(shape):
  out = 1
  for s in shape:
    out *= s
  return out


@contextlib.contextmanager
def quiet_stderr():
  """Output of C++ code to file descriptor 2, shown only if the call fails: libtpu's alarming
  start-up warnings (no TPU attached, no worker hostnames), and XLA's compile warnings for
  targets it cannot see (no deviceless CUB data; rematerialisation that could not reach its
  goal, which nmm-compile's own peak and fit report say plainly)."""
  with tempfile.TemporaryFile(mode="w+") as captured:
    saved = os.dup(2)
    os.dup2(captured.fileno(), 2)
    try:
      yield captured
    except Exception:
      os.dup2(saved, 2)
      captured.seek(0)
      print(captured.read(), end="", file=sys.stderr)
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def _described(name: str, describe):
  """The compile-only devices of `describe()`: a backend that is installed but cannot make them
  (a libtpu or plugin of another JAX version, a topology it does not know) is one line."""
  try:
    return describe().devices
  except Exception as e:  # noqa: BLE001 (the backends raise their own XlaRuntimeErrors)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise TopologyError(f"{name}: the installed backend cannot describe it: {first}") from e


def _tpu(name: str, generation: str, count: int) -> Target:
  prefix, per_chip, hbm, dims = TPU_GENERATIONS[generation]
  if count % per_chip:
    raise TopologyError(f"{name}: {generation}-N counts TensorCores, N must be even")
  grid = chip_grid(count // per_chip, dims)
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise TopologyError(f"{name}: compiling for TPUs needs libtpu: pip install -e '.[test]' "
                        f"(or jax[tpu] at the pinned version)") from None
  from jax.experimental import topologies
  # Compile-only devices open no chip: several compiles may run at once (libtpu otherwise
  # allows one process per machine, by a lock file).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  with quiet_stderr():
    devices = _described(name, lambda: topologies.get_topology_desc(
        platform="tpu", topology_name=f"{prefix}:{grid}"))
  return Target(name, list(devices), devices[0].device_kind, hbm, "tpu")


def _h100(name: str, count: int) -> Target:
  if count % 8:
    raise TopologyError(f"{name}: H100s come in hosts of 8 (h100-8, h100-16, ...)")
  try:
    import jax_cuda12_plugin  # noqa: F401
  except ImportError:
    raise TopologyError(f"{name}: compiling for H100s needs the CUDA plugin: "
                        f"pip install -e '.[compile-gpu]'") from None
  from jax.experimental import topologies
  with open(H100_CONFIG) as f:
    target_config = f.read()
  with quiet_stderr():
    hosts = f"{count // 8}x1x8"  # hosts x 1 x GPUs per host, NVLink inside a host
    devices = _described(name, lambda: topologies.get_topology_desc(
        hosts, platform="cuda", target_config=target_config, topology=hosts))
  hbm = int(re.search(r"device_memory_size:\s*(\d+)", target_config).group(1))
  return Target(name, list(devices), devices[0].device_kind, hbm, "cuda")


def _cpu(name: str, count: int) -> Target:
  devices = jax.devices("cpu")
  if len(devices) < count:
    raise TopologyError(
        f"{name}: only {len(devices)} CPU devices; start with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={count} (nmm-compile sets it)")
  # Host memory stands in for HBM: what a CPU mesh run could use.
  hbm = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // count
  return Target(name, devices[:count], devices[0].device_kind, hbm, "cpu")


def target(name: str) -> Target:
  match = re.fullmatch(r"(v4|v5p|v5e|v6e|h100|cpu)-(\d+)", name)
  if not match:
    raise TopologyError(f"unknown topology {name!r}; expected one of {NAMES}")
  kind, count = match.group(1), int(match.group(2))
  if count < 1:
    raise TopologyError(f"{name}: the count must be positive")
  if kind == "h100":
    return _h100(name, count)
  if kind == "cpu":
    return _cpu(name, count)
  return _tpu(name, kind, count)
