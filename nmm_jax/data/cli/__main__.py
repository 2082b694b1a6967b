"""nmm-data: write, inspect, tokenize and benchmark the data.

  nmm-data write --from=FORMAT --out=DATA_DIR ...      convert a dataset into shards
  nmm-data inspect SHARDS_OR_FOLDERS ...               counts, token/image statistics, contact sheet
  nmm-data train-tokenizer DATA_DIR ...                SentencePiece model from the shards' text
  nmm-data bench --config=configs/default.py ...       pipeline throughput and training data wait

`nmm-data COMMAND --help` lists a command's flags.
"""
from nmm_jax.subcommands import dispatch

COMMANDS = {
    "write": "nmm_jax.data.cli.write",
    "inspect": "nmm_jax.data.cli.inspect",
    "train-tokenizer": "nmm_jax.data.cli.train_tokenizer",
    "bench": "nmm_jax.data.cli.bench",
}


def run():
  dispatch("nmm-data", COMMANDS, __doc__)


if __name__ == "__main__":
  run()
