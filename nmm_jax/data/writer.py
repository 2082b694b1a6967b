"""Writes documents into ArrayRecord shards, and builds the embedded default dataset."""
import os
import shutil
import tempfile

from array_record.python.array_record_module import ArrayRecordWriter

from nmm_jax.data import synthetic
from nmm_jax.data.records import Document, encode_document
from nmm_jax.data.tokenizer import word_level_tokenizer

TOKENIZER_FILE = "tokenizer.json"
COMPLETE_MARKER = "COMPLETE"


def write_shards(documents: list[Document], directory: str, split: str, num_shards: int):
  os.makedirs(directory, exist_ok=True)
  for shard in range(num_shards):
    path = os.path.join(directory, f"{split}-{shard:05d}-of-{num_shards:05d}.array_record")
    # group_size:1 keeps every record individually addressable: Grain reads at random.
    writer = ArrayRecordWriter(path, "group_size:1")
    for doc in documents[shard::num_shards]:
      writer.write(encode_document(doc))
    writer.close()


def build_embedded_dataset(directory: str, *, train_docs: int, eval_docs: int, image_size: int,
                           seed: int, num_shards: int = 4):
  """Generates the shapes data under DIRECTORY/<source>/{train,eval}-*.array_record.

  Written to a temporary folder and renamed into place, so an interrupted build never leaves a
  half-written dataset that looks complete.
  """
  if os.path.exists(os.path.join(directory, COMPLETE_MARKER)):
    return
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".data-", dir=parent)
  try:
    for source in synthetic.SOURCES:
      docs = synthetic.generate_documents(source, train_docs + eval_docs, image_size, seed)
      write_shards(docs[:train_docs], os.path.join(staging, source), "train", num_shards)
      write_shards(docs[train_docs:], os.path.join(staging, source), "eval", 1)
    word_level_tokenizer(synthetic.VOCABULARY, os.path.join(staging, TOKENIZER_FILE))
    open(os.path.join(staging, COMPLETE_MARKER), "w").close()
    try:
      os.rename(staging, directory)
    except OSError:
      # Another process finished the same deterministic build first: use theirs.
      if not os.path.exists(os.path.join(directory, COMPLETE_MARKER)):
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
