"""nmm-data write: convert a dataset into ArrayRecord shards of one source.

  nmm-data write --from=captions --captions=caps.jsonl [--images=DIR] --out=DATA_DIR
  nmm-data write --from=interleaved --documents=docs.jsonl [--images=DIR] --out=DATA_DIR
  nmm-data write --from=webdataset --out=DATA_DIR shard-000.tar shard-001.tar ...
  nmm-data write --from=parquet [--image_column=image --text_column=caption] --out=DATA_DIR
      part-*.parquet                      (caption pairs)
  nmm-data write --from=parquet --texts_column=texts --images_column=images --out=DATA_DIR
      obelics-*.parquet                   (interleaved documents)
  nmm-data write --from=hf --hf_path=SAVED_DATASET [--hf_split=train] --out=DATA_DIR
  nmm-data write --from=tfds --tfds_name=NAME [--tfds_data_dir=DIR] --out=DATA_DIR
  nmm-data write --from=sklearn-digits --image_size=224 --out=DATA_DIR

writes DATA_DIR/<source>/{train,eval}-*.array_record and manifest.json.
"""
import os

from absl import flags

from nmm_jax.data import conversion
from nmm_jax.data.importers import FORMATS, make_importer

DEFAULT_SOURCE = {"captions": "caption", "interleaved": "interleaved", "webdataset": "caption",
                  "sklearn-digits": "digits"}  # parquet / hf: caption, or interleaved

flags.DEFINE_enum("from", None, FORMATS, "Input format.")
flags.DEFINE_string("out", None, "Data folder; the source is written to OUT/<source>.")
flags.DEFINE_string("source", "", "Source name (the data.mixture key). Default: caption / "
                    "interleaved / digits / the TFDS name.")
flags.DEFINE_integer("num_shards", 8, "Train shards (eval gets a proportional number).")
flags.DEFINE_float("eval_fraction", 0.05, "Fraction of documents held out as the eval split.")
flags.DEFINE_integer("workers", os.cpu_count() or 1, "Worker processes writing shards.")
flags.DEFINE_integer("seed", 0, "Seed of the train/eval split.")
flags.DEFINE_bool("overwrite", False, "Replace an existing OUT/<source>.")
flags.DEFINE_integer("max_image_side", 0, "Downscale larger images to this longest side "
                     "(0: keep). The pipeline crops and resizes anyway; this saves disk.")
flags.DEFINE_string("captions", "", "captions: JSONL of {image, caption} objects.")
flags.DEFINE_string("documents", "", "interleaved: JSONL of documents.")
flags.DEFINE_string("images", "", "captions/interleaved/parquet/hf: image root (default: the "
                    "JSONL's, Parquet file's or dataset's folder).")
flags.DEFINE_string("image_key", "", "Image key (captions: 'image'; tfds: found by type).")
flags.DEFINE_string("text_key", "", "Caption key (captions/webdataset: 'caption'; tfds: by type).")
flags.DEFINE_string("image_column", "", "parquet/hf: image column of caption pairs (default "
                    "'image'): {bytes, path} structs, bytes, or paths under --images.")
flags.DEFINE_string("text_column", "", "parquet/hf: caption column (default 'caption').")
flags.DEFINE_string("texts_column", "", "parquet/hf interleaved rows: the list of texts (with "
                    "--images_column; OBELICS: 'texts').")
flags.DEFINE_string("images_column", "", "parquet/hf interleaved rows: the list of images, "
                    "aligned with --texts_column (OBELICS: 'images').")
flags.DEFINE_string("hf_path", "", "hf: a folder written by datasets' save_to_disk.")
flags.DEFINE_string("hf_split", "", "hf: the split, when the folder holds several.")
flags.DEFINE_float("max_skip_fraction", 0.5, "Fail (and replace nothing) when more than this "
                   "fraction of the items is skipped; a conversion that writes no document "
                   "always fails.")
flags.DEFINE_string("tfds_name", "", "tfds: dataset name, e.g. 'coco_captions' or 'name/config'.")
flags.DEFINE_string("tfds_data_dir", "", "tfds: data dir holding the prepared dataset.")
flags.DEFINE_string("tfds_split", "train", "tfds: split to read.")
flags.DEFINE_integer("image_size", 224, "sklearn-digits: side the 8x8 digits are upsampled to "
                     "(the model's data.image_size).")
flags.mark_flags_as_required(["from", "out"])
FLAGS = flags.FLAGS


def _importer_options(fmt: str, shards: list) -> dict:
  f = FLAGS
  side = {"max_image_side": f.max_image_side}
  if fmt == "captions":
    if not f.captions:
      raise flags.ValidationError("--from=captions needs --captions=FILE.jsonl")
    return dict(captions=f.captions, images=f.images, image_key=f.image_key or "image",
                text_key=f.text_key or "caption", **side)
  if fmt == "interleaved":
    if not f.documents:
      raise flags.ValidationError("--from=interleaved needs --documents=FILE.jsonl")
    return dict(documents=f.documents, images=f.images, **side)
  if fmt == "webdataset":
    if not shards:
      raise flags.ValidationError("--from=webdataset needs .tar shard paths or globs as arguments")
    return dict(shards=shards, text_key=f.text_key or "caption", **side)
  if fmt in ("parquet", "hf"):
    columns = dict(image_column=f.image_column, text_column=f.text_column,
                   texts_column=f.texts_column, images_column=f.images_column, images=f.images,
                   **side)
    if fmt == "hf":
      if not f.hf_path:
        raise flags.ValidationError("--from=hf needs --hf_path=FOLDER (a save_to_disk folder)")
      return dict(path=f.hf_path, split=f.hf_split, **columns)
    if not shards:
      raise flags.ValidationError("--from=parquet needs .parquet paths or globs as arguments")
    return dict(files=shards, **columns)
  if fmt == "tfds":
    if not f.tfds_name:
      raise flags.ValidationError("--from=tfds needs --tfds_name")
    return dict(name=f.tfds_name, data_dir=f.tfds_data_dir, split=f.tfds_split,
                image_key=f.image_key, text_key=f.text_key, **side)
  return dict(image_size=f.image_size)


def _default_source(fmt: str) -> str:
  if fmt in ("parquet", "hf"):
    return "interleaved" if FLAGS.texts_column or FLAGS.images_column else "caption"
  return DEFAULT_SOURCE.get(fmt) or FLAGS.tfds_name.split("/")[0]


def main(argv):
  fmt = FLAGS["from"].value
  shards = argv[1:]
  if shards and fmt not in ("webdataset", "parquet"):
    raise flags.ValidationError(f"unexpected arguments {shards} (only --from=webdataset and "
                                "--from=parquet take file paths)")
  if "://" in FLAGS.out:
    raise flags.ValidationError(f"--out={FLAGS.out}: nmm-data write writes a local folder; "
                                "copy it to the bucket afterwards (gcloud storage cp -r DIR "
                                f"{FLAGS.out}) and train with --config.data.dir={FLAGS.out}")
  options = _importer_options(fmt, shards)
  source = FLAGS.source or _default_source(fmt)
  importer = make_importer(fmt, **options)
  summary = conversion.write_source(
      importer, FLAGS.out, source, num_shards=FLAGS.num_shards,
      eval_fraction=FLAGS.eval_fraction, workers=FLAGS.workers, seed=FLAGS.seed,
      overwrite=FLAGS.overwrite, inputs={"format": fmt, **options},
      max_skip_fraction=FLAGS.max_skip_fraction)
  print(conversion.format_summary(summary, os.path.join(FLAGS.out, source)))
