"""Writes documents into ArrayRecord shards, and builds the embedded datasets (shapes, world)."""
import os
import shutil
import tempfile

from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter

from nmm_jax.data import synthetic, world
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


def _embedded_documents(kind: str, source: str, count: int, image_size: int, seed: int,
                        entities: int, zipf: float) -> list[Document]:
  if kind == "world":
    return world.generate_documents(source, count, image_size, seed, entities=entities, zipf=zipf)
  return synthetic.generate_documents(source, count, image_size, seed)


def build_embedded_dataset(directory: str, *, train_docs: int, eval_docs: int, image_size: int,
                           seed: int, kind: str = "shapes", entities: int = 16384,
                           zipf: float = 1.1, num_shards: int = 4):
  """Generates the embedded data (`kind`: "shapes" or "world") under
  DIRECTORY/<source>/{train,eval}-*.array_record, with its tokenizer; the world data also gets
  ENTROPY_FILE, its entropy floor (world.py).

  Written to a temporary folder and renamed into place, so an interrupted build never leaves a
  half-written dataset that looks complete.
  """
  if os.path.exists(os.path.join(directory, COMPLETE_MARKER)):
    return
  module = world if kind == "world" else synthetic
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".data-", dir=parent)
  try:
    held_out = {}
    for source in module.SOURCES:
      if kind == "world":
        logging.info("embedded world data: %d + %d %s documents", train_docs, eval_docs, source)
      docs = _embedded_documents(kind, source, train_docs + eval_docs, image_size, seed,
                                 entities, zipf)
      write_shards(docs[:train_docs], os.path.join(staging, source), "train", num_shards)
      write_shards(docs[train_docs:], os.path.join(staging, source), "eval", 1)
      held_out[source] = docs[train_docs:]
    if kind == "world":
      world.write_entropy_file(held_out, os.path.join(staging, world.ENTROPY_FILE))
    word_level_tokenizer(module.VOCABULARY, os.path.join(staging, TOKENIZER_FILE))
    open(os.path.join(staging, COMPLETE_MARKER), "w").close()
    try:
      os.rename(staging, directory)
    except OSError:
      # Another process finished the same deterministic build first: use theirs.
      if not os.path.exists(os.path.join(directory, COMPLETE_MARKER)):
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
