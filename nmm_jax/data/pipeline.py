"""Grain pipeline: ArrayRecord shards of documents -> packed batches in the batch contract.

  shards per source -> slice by process -> shuffle -> repeat -> decode+tokenize
  -> mix by weight -> first-fit pack into [seq_len] rows (<= max_images images each) -> batch
  -> global image ids

Every stage is a Grain dataset, so the iterator's state (saved with the checkpoint) resumes the
exact stream.
"""
import os

import grain
import jax
import numpy as np

from nmm_jax.data import synthetic, writer
from nmm_jax.data.records import ImageSegment, decode_document
from nmm_jax.data.tokenizer import (BOS, EOS, IMAGE, IMAGE_END, IMAGE_START, NON_TEXT_IDS,
                                    WordTokenizer)

TOKEN_KEYS = ("tokens", "targets", "loss_mask", "image_ids", "patch_ids", "source")
_PAD_VALUES = {"image_ids": -1, "patch_ids": -1, "source": -1}


def data_dir(config, workdir: str) -> str:
  """The shard folder: data.dir, or the embedded shapes data built once under WORKDIR/data."""
  if config.data.dir:
    if not os.path.isdir(config.data.dir):
      raise FileNotFoundError(f"config.data.dir={config.data.dir!r} is not a folder")
    return config.data.dir
  directory = os.path.join(workdir, "data")
  s = config.data.synthetic
  writer.build_embedded_dataset(directory, train_docs=s.train_docs, eval_docs=s.eval_docs,
                                image_size=config.data.image_size, seed=s.seed)
  return directory


def load_tokenizer(directory: str) -> WordTokenizer:
  return WordTokenizer.load(os.path.join(directory, writer.TOKENIZER_FILE))


def source_names(config) -> list[str]:
  return sorted(config.data.mixture)


def document_features(doc, tokenizer, source_id: int, patches_per_image: int, image_size: int):
  """One document -> unpacked per-token features (inputs shifted against targets) and images."""
  ids, image_ids, patch_ids, images = [BOS], [-1], [-1], []
  for segment in doc.segments:
    if isinstance(segment, ImageSegment):
      pixels = segment.decode()
      if pixels.shape != (image_size, image_size, 3):
        raise ValueError(f"image of shape {pixels.shape}, expected {(image_size, image_size, 3)}")
      ids += [IMAGE_START] + [IMAGE] * patches_per_image + [IMAGE_END]
      image_ids += [-1] + [len(images)] * patches_per_image + [-1]
      patch_ids += [-1] + list(range(patches_per_image)) + [-1]
      images.append(pixels)
    else:
      words = tokenizer.encode(segment)
      ids += words
      image_ids += [-1] * len(words)
      patch_ids += [-1] * len(words)
  # image_ids/patch_ids describe the inputs: every id except the final EOS.
  ids = np.asarray(ids + [EOS], np.int32)
  targets = ids[1:]
  features = {
      "tokens": ids[:-1],
      "targets": targets,
      "loss_mask": (~np.isin(targets, NON_TEXT_IDS)).astype(np.float32),
      "image_ids": np.asarray(image_ids, np.int32),
      "patch_ids": np.asarray(patch_ids, np.int32),
      "source": np.full(targets.shape, source_id, np.int32),
  }
  # The packer packs each feature on its own: unequal lengths would silently misalign them.
  assert all(len(v) == len(targets) for v in features.values()), {
      k: len(v) for k, v in features.items()}
  features["images"] = (np.stack(images) if images
                        else np.zeros((0, image_size, image_size, 3), np.uint8))
  return features


def assign_global_image_ids(batch):
  """Packing keeps each document's image ids local (0..n-1); make them index the packed row's
  `images`, and rename the packer's outputs to the batch contract."""
  img_seg_BxI = batch.pop("images_segment_ids")
  seg_BxL = batch["tokens_segment_ids"]
  # First image slot of each position's document = argmax over slots of a segment match.
  match_BxLxI = img_seg_BxI[:, None, :] == seg_BxL[:, :, None]
  first_slot_BxL = np.argmax(match_BxLxI, axis=-1).astype(np.int32)
  is_image = batch["image_ids"] >= 0
  batch["image_ids"] = np.where(is_image, batch["image_ids"] + first_slot_BxL, -1).astype(np.int32)
  out = {k: batch[k] for k in TOKEN_KEYS + ("images",)}
  out["segment_ids"] = seg_BxL
  out["positions"] = batch["tokens_positions"]
  return out


def _document_dataset(paths, config, tokenizer, source_id, seed, *, train: bool):
  ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))
  ds = ds[jax.process_index()::jax.process_count()]
  if train:
    ds = ds.shuffle(seed=seed).repeat()
  p = (config.data.image_size // config.model.patch_size) ** 2
  max_len = config.data.seq_len

  def featurize(raw):
    return document_features(decode_document(raw), tokenizer, source_id, p,
                             config.data.image_size)

  def fits(features):
    return (len(features["tokens"]) <= max_len
            and len(features["images"]) <= config.data.max_images)

  return ds.map(featurize).filter(fits)


def make_dataset(config, directory: str, split: str, *, seed: int):
  """The per-process batch stream for `split` ("train": infinite, shuffled; "eval": one pass)."""
  tokenizer = load_tokenizer(directory)
  names = source_names(config)
  train = split == "train"
  parts, weights = [], []
  for source_id, name in enumerate(names):
    paths = writer.shard_paths(os.path.join(directory, name), split)
    if not paths:
      raise FileNotFoundError(f"data.mixture names source {name!r} but {directory}/{name} holds "
                              f"no {split}-*.array_record shards")
    parts.append(_document_dataset(paths, config, tokenizer, source_id, seed + source_id,
                                   train=train))
    weights.append(config.data.mixture[name])
  # Evaluation mixes too (one pass, ending with the first source to run out), so every source
  # appears in the first few eval batches.
  mixed = grain.MapDataset.mix(parts, weights)
  length = {k: config.data.seq_len for k in TOKEN_KEYS}
  length["images"] = config.data.max_images
  packed = grain.experimental.FirstFitPackIterDataset(
      mixed.to_iter_dataset(), length_struct=length, num_packing_bins=config.data.num_packing_bins,
      seed=seed, shuffle_bins=train,
      padding_struct={k: _PAD_VALUES.get(k, 0) for k in length})
  per_process = config.train.batch_size // jax.process_count()
  return packed.batch(per_process, drop_remainder=train).map(assign_global_image_ids)
