r"""nmm-checkpoints: which of a run's checkpoints can be read back.

  nmm-checkpoints verify --workdir=runs/default

For every committed step: the saved config, the state's metadata and every array of the state
(read on the host, so each file is read whole: a truncated or missing file fails here), and
the data-iterator files. Prints one line per step, "sound" or "UNREADABLE: why", and exits 1
when any step is unreadable. Nothing is moved or changed (a training run moves unreadable steps
aside itself, to checkpoints/unreadable-<step>/). Steps already set aside are listed apart.
"""
import json
import sys
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (local or gs://...).")


def verify_step(checkpointer, step: int) -> int:
  """Reads everything of `step`; returns the bytes read. Raises whatever the read raised."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  checkpointer.saved_config(step)
  folder = checkpointer.directory / str(step)
  handler = ocp.PyTreeCheckpointer()
  metadata = handler.metadata(folder / "state").item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  arrays = handler.restore(folder / "state", args=ocp.args.PyTreeRestore(
      restore_args=restore_args))
  size = sum(np.asarray(a).nbytes for a in jax.tree.leaves(arrays))
  for path in (folder / "data").iterdir():
    if path.name.endswith(".json"):
      json.loads(path.read_text())
  return size


def verify(workdir: str) -> int:
  """Prints the verdict on every step; returns the number of unreadable ones."""
  from nmm_jax.checkpoint import SUPERSEDED_PREFIX, UNREADABLE_PREFIX, Checkpointer, one_line

  checkpointer = Checkpointer(workdir, keep=1_000_000, async_save=False)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise FileNotFoundError(f"{checkpointer.directory} holds no committed checkpoint")
    bad = 0
    for step in steps:
      t0 = time.perf_counter()
      try:
        size = verify_step(checkpointer, step)
      except Exception as e:  # noqa: BLE001 - every failure is a verdict on the step
        bad += 1
        print(f"{step:>8}  UNREADABLE: {one_line(e)}")
      else:
        print(f"{step:>8}  sound ({size / 2**20:.1f} MiB of arrays read in "
              f"{time.perf_counter() - t0:.1f} s)")
    aside = sorted(p.name for p in checkpointer.directory.iterdir()
                   if p.name.startswith((UNREADABLE_PREFIX, SUPERSEDED_PREFIX)))
    if aside:
      print(f"set aside earlier (not checked): {', '.join(aside)}")
    print(f"{len(steps) - bad} sound, {bad} unreadable")
    return bad
  finally:
    checkpointer.close()


def main(argv):
  if len(argv) != 2 or argv[1] != "verify":
    raise app.UsageError("usage: nmm-checkpoints verify --workdir=DIR")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  try:
    bad = verify(_WORKDIR.value)
  except FileNotFoundError as e:
    print(f"nmm-checkpoints: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(1 if bad else 0)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
