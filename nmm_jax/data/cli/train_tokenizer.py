"""nmm-data train-tokenizer: a SentencePiece model from the text of some shards.

  nmm-data train-tokenizer DATA_DIR [--vocab_size=32000] [--out=DATA_DIR/tokenizer.model]

The model has the special tokens the pipeline needs (<pad> <bos> <eos> <image> <image_start>
<image_end>); saved as DATA_DIR/tokenizer.model, the pipeline finds it without data.tokenizer.
Training is single-threaded, so the same shards give the same model.
"""
import itertools
import os
import time

from absl import flags

from nmm_jax.data.shards import expand_shards, iter_documents
from nmm_jax.data.tokenizer import load_tokenizer, train_sentencepiece

flags.DEFINE_string("out", "", "Model file (default: tokenizer.model in the first argument, "
                    "when it is a folder).")
flags.DEFINE_integer("vocab_size", 32000, "Vocabulary size, special tokens included (an upper "
                     "bound: a small corpus may give fewer pieces).")
flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece algorithm (unigram "
                  "needs a large corpus: on a few thousand captions it falls back to "
                  "characters).")
flags.DEFINE_integer("max_documents", 200_000, "Train on at most this many documents.")
flags.DEFINE_string("split", "train", "Shards of this split.")
FLAGS = flags.FLAGS


def shard_texts(shards, max_documents: int):
  """The text segments of the first `max_documents` readable documents."""
  documents = (doc for _, doc in iter_documents(shards) if not isinstance(doc, str))
  for doc in itertools.islice(documents, max_documents):
    yield from (s for s in doc.segments if isinstance(s, str))


def main(argv):
  inputs = argv[1:]
  if not inputs:
    raise flags.ValidationError("give the data folder or shards to train on")
  out = FLAGS.out or (os.path.join(inputs[0], "tokenizer.model") if os.path.isdir(inputs[0])
                      else "")
  if not out.endswith(".model"):
    raise flags.ValidationError(f"--out must name a '.model' file, got {out!r}")
  shards = expand_shards(inputs, FLAGS.split)
  start = time.perf_counter()
  texts = list(shard_texts(shards, FLAGS.max_documents))
  if not texts:
    raise ValueError(f"no text in {len(shards)} shards")
  train_sentencepiece(texts, out, vocab_size=FLAGS.vocab_size, model_type=FLAGS.model_type)
  tokenizer = load_tokenizer(out)
  print(f"wrote {out}: {tokenizer.vocab_size} pieces ({FLAGS.model_type}) from {len(texts)} text "
        f"segments of {len(shards)} shards in {time.perf_counter() - start:.1f} s")
  sample = texts[0][:80]
  print(f"e.g. {sample!r} -> {tokenizer.encode(sample)}")
