"""Console scripts with subcommands (`nmm-data write ...`, `nmm-scaling fit ...`).

Each subcommand is a module with absl flags and `main(argv)`; only the chosen one is imported, so
only its flags exist. Bad input or flags end with one line naming the problem, not a traceback.
"""
import importlib
import sys

from absl import app, flags, logging

# Errors that mean "the input or the flags are wrong", reported as one line.
USER_ERRORS = (FileNotFoundError, FileExistsError, ValueError, ImportError, KeyError,
               flags.ValidationError)


def dispatch(program: str, commands: dict, usage: str):
  """Runs `program COMMAND [flags]`; `commands` maps a command to its module's import path."""
  if len(sys.argv) < 2 or sys.argv[1] not in commands:
    print(usage.strip(), file=sys.stderr)
    if len(sys.argv) >= 2 and sys.argv[1] not in ("-h", "--help", "help"):
      print(f"\n{program}: unknown command {sys.argv[1]!r}", file=sys.stderr)
    sys.exit(2)
  command = sys.argv[1]
  module = importlib.import_module(commands[command])
  sys.argv = [f"{program} {command}"] + sys.argv[2:]
  app.run(reporting_errors(f"{program} {command}", module.main))


def reporting_errors(name, main):
  """`main` for app.run, with USER_ERRORS reported as one line naming `name` (also used by
  single-command scripts such as nmm-export)."""
  def wrapped(argv):
    # Orbax and JAX log at INFO; the commands print what matters, warnings still show.
    logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except USER_ERRORS as e:
      sys.exit(f"{name}: {type(e).__name__}: {e}")
  return wrapped
