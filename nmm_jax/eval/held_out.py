"""Held-out image-caption pairs of one source, read from its eval shards."""
import dataclasses
import os

import numpy as np
from absl import logging

from nmm_jax.data import images as images_lib
from nmm_jax.data import shards
from nmm_jax.data.records import ImageSegment


@dataclasses.dataclass
class CaptionExample:
  where: str               # shard[record]
  image: np.ndarray        # [S, S, 3] uint8, the eval view
  caption: str
  meta: dict               # the document's meta (the shapes data: {"attributes": [{...}]})


def caption_examples(directory: str, source: str, image_size: int,
                     limit: int = 0) -> list[CaptionExample]:
  """The first `limit` (0: all) documents of DIRECTORY/SOURCE/eval-* that are one image then
  one text. Records that cannot be read or decoded are skipped and counted in a warning."""
  paths = shards.shard_paths(os.path.join(directory, source), "eval")
  if not paths:
    raise FileNotFoundError(f"{directory}/{source} holds no eval-*.array_record shards")
  examples, skipped = [], 0
  for where, doc in shards.iter_documents(paths):
    if limit and len(examples) == limit:
      break
    if isinstance(doc, str):  # the reason it could not be read
      skipped += 1
      logging.debug("skipping %s: %s", where, doc)
      continue
    if not (len(doc.segments) == 2 and isinstance(doc.segments[0], ImageSegment)
            and isinstance(doc.segments[1], str)):
      continue  # not an image-caption pair
    try:
      image = images_lib.eval_view(images_lib.decode(doc.segments[0].encoded), image_size)
    except Exception as e:  # PIL raises many types for broken bytes: skipped, counted
      skipped += 1
      logging.debug("skipping %s: %s", where, e)
      continue
    examples.append(CaptionExample(where, image, doc.segments[1], doc.meta))
  if skipped:
    logging.warning("%s/%s: skipped %d unreadable eval records", directory, source, skipped)
  return examples


def run_caption_examples(run_config, workdir: str, source: str, image_size: int,
                         data_dir: str = "", limit: int = 0) -> list[CaptionExample]:
  """caption_examples of `source` in `data_dir`, or in the data the run in `workdir` read."""
  directory = data_dir or shards.run_data_folder(run_config, workdir)
  return caption_examples(directory, source, image_size, limit=limit)
