"""Grain pipeline: ArrayRecord shards of documents -> packed batches in the batch contract.

  shards per source (unreadable ones left out) -> slice by process -> shuffle -> repeat
  -> decode, augment, tokenize, split long documents (features.py)   [a bad record -> Skip]
  -> mix by weight -> unpack pieces, count skips -> first-fit pack into [seq_len] rows
  (<= max_images images each) -> batch -> global image ids -> attach skip counts

Every stage is a Grain dataset, so the iterator's state (saved with the checkpoint) resumes the
exact stream, skip counts included. Randomness (shuffle, crops, flips) is keyed by the record's
index, not drawn from a global generator.
"""
import functools
import os

import grain
import msgpack
import numpy as np
from absl import flags

from nmm_jax.data import batch as batch_lib
from nmm_jax.data import images as images_lib
from nmm_jax.data import shards
from nmm_jax.data import streams as streams_lib
from nmm_jax.data.batch import PIECE_KEYS
from nmm_jax.data.features import SkipDocument, document_pieces
from nmm_jax.data.records import decode_document
from nmm_jax.data.stages import (
  RecordError,
  ShardedRecords,
  Skip,
  SkipCounter,
  SkipTally,
  Unpack,
  attach_skip_counts,
  set_worker_index,
)


def source_names(config) -> list[str]:
  return sorted(config.data.mixture)


def featurize(record, tokenizer, source_id: int, image_view, piece_shape: dict):
  """(where, raw bytes | RecordError) -> list of unpacked pieces, or a Skip marker.

  `image_view(encoded) -> [S, S, 3] uint8`; `piece_shape`: the keyword arguments of
  `document_pieces` that come from the config (read once per pipeline, not per record)."""
  where, raw = record
  if isinstance(raw, RecordError):
    return Skip(raw.reason, where, raw.detail)
  try:
    doc = decode_document(raw)
  except (ValueError, KeyError, TypeError, msgpack.exceptions.UnpackException) as e:
    return Skip("unparsable", where, f"{type(e).__name__}: {e}")
  try:
    return document_pieces(doc, tokenizer, source_id, image_view=image_view, **piece_shape)
  except SkipDocument as e:
    return Skip(e.reason, where, e.detail)


def assign_global_image_ids(batch):
  """Packing keeps each document's image ids local (0..n-1); make them index the packed row's
  `images`, and rename the packer's outputs to the batch contract."""
  img_seg_BxI = batch.pop("images_segment_ids")
  seg_BxL = batch["tokens_segment_ids"]
  # First image slot of each position's document = argmax over slots of a segment match.
  match_BxLxI = img_seg_BxI[:, None, :] == seg_BxL[:, :, None]
  first_slot_BxL = np.argmax(match_BxLxI, axis=-1).astype(np.int32)
  is_image = batch["image_ids"] >= 0
  batch["image_ids"] = np.where(is_image, batch["image_ids"] + first_slot_BxL,
                               batch_lib.NO_IMAGE).astype(np.int32)
  out = {k: batch[k] for k in PIECE_KEYS + ("images",)}
  out["segment_ids"] = seg_BxL
  out["positions"] = batch["tokens_positions"]
  return out


def _source_dataset(records, config, tokenizer, source_id, seed, stream, total, *, train: bool):
  ds = grain.MapDataset.source(records)
  ds = ds[stream::total]  # this stream's records (streams.py)
  d, size = config.data, config.data.image_size
  piece_shape = dict(patches_per_image=(size // config.model.patch_size) ** 2, image_size=size,
                     seq_len=d.seq_len, max_images=d.max_images)
  fn = functools.partial(featurize, tokenizer=tokenizer, source_id=source_id,
                         piece_shape=piece_shape)
  if not train:
    eval_view = lambda encoded: images_lib.eval_view(images_lib.decode(encoded), size)
    return ds.map(functools.partial(fn, image_view=eval_view))
  augment = dict(crop_scale=tuple(d.augment.crop_scale), flip_prob=float(d.augment.flip_prob))

  def featurize_augmented(record, rng):
    train_view = lambda encoded: images_lib.train_view(images_lib.decode(encoded), size, rng,
                                                       **augment)
    return fn(record, image_view=train_view)

  ds = ds.shuffle(seed=seed).repeat()
  # random_map: the augmentation rng is derived from the element's index, so a resumed
  # iterator crops and flips exactly as an uninterrupted one.
  return ds.random_map(featurize_augmented, seed=seed)


def _open_sources(config, directory: str, split: str) -> tuple:
  """([(records, weight)] in source-id order, number of unreadable shards)."""
  sources, unreadable = [], 0
  for name in source_names(config):
    paths = shards.shard_paths(os.path.join(directory, name), split)
    if not paths:
      raise FileNotFoundError(f"data.mixture names source {name!r} but {directory}/{name} holds "
                              f"no {split}-*.array_record shards")
    records = ShardedRecords(paths)
    if not len(records):
      raise FileNotFoundError(f"source {name!r}: none of its {len(paths)} {split} shards in "
                              f"{directory}/{name} could be read (see the warnings above)")
    total = streams_lib.num_streams(config)
    if len(records) < total:  # stream s reads records s::total: one would have none
      raise ValueError(f"source {name!r} has {len(records)} readable {split} records in "
                       f"{directory}/{name}, fewer than the {total} data streams "
                       "(data.streams, or one per process); write more records or use fewer "
                       "streams")
    unreadable += len(records.unreadable)
    sources.append((records, config.data.mixture[name]))
  return sources, unreadable


def _stream_batches(config, sources, tokenizer, stream: int, total: int, unreadable: int, *,
                    seed: int, train: bool):
  """Batches of `train.batch_size / total` rows from stream `stream` of `total`."""
  parts = [_source_dataset(records, config, tokenizer, source_id, seed + source_id, stream,
                           total, train=train)
           for source_id, (records, _) in enumerate(sources)]
  # Evaluation mixes too (one pass, ending with the first source to run out), so every source
  # appears in the first few eval batches.
  mixed = grain.MapDataset.mix(parts, [weight for _, weight in sources])
  # Unreadable shards are counted once, by stream 0.
  counter = SkipCounter({"unreadable_shard": unreadable} if unreadable and stream == 0 else None)
  # No reader threads: featurizing is Python-bound, and threads contending for the GIL made the
  # pipeline 2.4x slower (178 -> 428 sequences/s on the default config). Parallelism comes
  # from worker processes (data.num_workers) instead.
  pieces = Unpack(mixed.to_iter_dataset(grain.ReadOptions(num_threads=0)), counter)
  length = {k: config.data.seq_len for k in PIECE_KEYS}
  length["images"] = config.data.max_images
  packed = grain.experimental.FirstFitPackIterDataset(
      pieces, length_struct=length, num_packing_bins=config.data.num_packing_bins,
      seed=seed, shuffle_bins=train,
      padding_struct={k: batch_lib.FIELDS[k].pad for k in length})
  rows = config.train.batch_size // total
  batches = packed.batch(rows, drop_remainder=train).map(assign_global_image_ids)
  if not train:
    batches = batches.map(functools.partial(batch_lib.pad_rows, rows=rows))
  batches = batches.map(functools.partial(attach_skip_counts, counter=counter, stream=stream))
  if train and config.data.num_workers:
    if not flags.FLAGS.is_parsed():
      # Grain's worker start-up reads its absl flags; outside an absl app (a notebook, a
      # test) they were never parsed, and their defaults are what we want.
      flags.FLAGS.mark_as_parsed()
    # Each worker process runs the stream's pipeline on its slice of the mixed documents; their
    # batches are taken in turn. The stream depends on num_workers (keep it fixed to resume).
    batches = batches.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=config.data.num_workers,
                                     per_worker_buffer_size=2),
        worker_init_fn=set_worker_index)
  return batches


def make_dataset(config, directory: str, split: str, *, seed: int):
  """This process's batches for `split` ("train": infinite, shuffled; "eval": one pass): its
  rows of each global batch, from the data streams it runs (streams.py).

  Each batch also carries `skipped`: {reason: documents skipped so far by this process}.
  Training batches are prepared ahead in a thread (`data.prefetch`) and optionally by worker
  processes (`data.num_workers`); the iterator state covers both.
  """
  tokenizer = shards.load_tokenizer(config, directory)
  train = split == "train"
  sources, unreadable = _open_sources(config, directory, split)
  total = streams_lib.num_streams(config)
  per_stream = {s: _stream_batches(config, sources, tokenizer, s, total, unreadable, seed=seed,
                                   train=train)
                for s in streams_lib.local_streams(config)}
  batches = streams_lib.ConcatStreams(per_stream,
                                      empty_like=None if train else batch_lib.empty_like)
  batches = batches.map(SkipTally())
  if train and config.data.prefetch:
    # Prepares the next batches while the step loop waits on the device.
    batches = grain.experimental.ThreadPrefetchIterDataset(
        batches, prefetch_buffer_size=config.data.prefetch)
  return batches
