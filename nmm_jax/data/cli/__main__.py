"""nmm-data: write, inspect, tokenize and benchmark the data.

  nmm-data write --from=FORMAT --out=DATA_DIR ...      convert a dataset into shards
  nmm-data inspect SHARDS_OR_FOLDERS ...               counts, token/image statistics, contact sheet
  nmm-data train-tokenizer --data=DATA_DIR ...         SentencePiece model from the shards' text
  nmm-data bench --config=configs/default.py ...       pipeline throughput and training data wait

`nmm-data COMMAND --help` lists a command's flags.
"""
import importlib
import sys

from absl import app, flags, logging

COMMANDS = {
    "write": "nmm_jax.data.cli.write",
    "inspect": "nmm_jax.data.cli.inspect",
    "train-tokenizer": "nmm_jax.data.cli.train_tokenizer",
    "bench": "nmm_jax.data.cli.bench",
}


def run():
  if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    print(__doc__.strip(), file=sys.stderr)
    if len(sys.argv) >= 2 and sys.argv[1] not in ("-h", "--help", "help"):
      print(f"\nnmm-data: unknown command {sys.argv[1]!r}", file=sys.stderr)
    sys.exit(2)
  command = sys.argv[1]
  # Only the chosen command's module is imported, so only its flags are defined.
  module = importlib.import_module(COMMANDS[command])
  sys.argv = [f"nmm-data {command}"] + sys.argv[2:]
  app.run(_reporting_errors(command, module.main))


# Bad input and bad flags end with one line naming the problem, not a traceback.
_USER_ERRORS = (FileNotFoundError, FileExistsError, ValueError, ImportError,
                flags.ValidationError)


def _reporting_errors(command, main):
  def wrapped(argv):
    # Orbax and JAX log at INFO; the commands print what matters, warnings still show.
    logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except _USER_ERRORS as e:
      sys.exit(f"nmm-data {command}: {type(e).__name__}: {e}")
  return wrapped


if __name__ == "__main__":
  run()
