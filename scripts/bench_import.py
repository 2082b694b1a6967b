"""Conversion throughput of `nmm-data write`: the same photos as Parquet and as a WebDataset tar.

  .venv/bin/python scripts/bench_import.py [--photos=2000] [--workers=2] [--row_group=64]

The photos are crops of scikit-learn's two bundled sample photographs (china.jpg, flower.jpg,
640x427), each crop resized to 384x256 and saved as its own JPEG (quality 90, about 30 KB), so
every image is distinct, real-photo content. No download. Both inputs hold the same bytes and
captions. Each conversion runs as the real command in a subprocess; its wall time gives
documents/s and input MiB/s. Its peak memory is the largest resident set of the command and its
worker processes (getrusage of the waited children, in a wrapper process per run). The Parquet
file holds many row groups, so the figure shows memory bounded by a row group, not the file.
"""
import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def photos(count: int, seed: int = 0):
  """`count` distinct JPEG crops of the bundled photographs, with captions."""
  from sklearn.datasets import load_sample_images
  sources = [Image.fromarray(a) for a in load_sample_images().images]
  rng = np.random.default_rng(seed)
  for i in range(count):
    image = sources[i % 2]
    w, h = int(rng.integers(320, 640)), int(rng.integers(220, 427))
    x, y = int(rng.integers(0, 640 - w + 1)), int(rng.integers(0, 427 - h + 1))
    crop = image.crop((x, y, x + w, y + h)).resize((384, 256), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    crop.save(buffer, format="JPEG", quality=90)
    yield buffer.getvalue(), f"a photo of {'a pagoda' if i % 2 == 0 else 'a flower'}, crop {i}"


def write_inputs(folder: str, count: int, row_group: int):
  records = list(photos(count))
  parquet = os.path.join(folder, "photos.parquet")
  table = pa.table({"image": [{"bytes": b, "path": None} for b, _ in records],
                    "caption": [c for _, c in records]})
  pq.write_table(table, parquet, row_group_size=row_group)
  tar = os.path.join(folder, "photos.tar")
  with tarfile.open(tar, "w") as out:
    for i, (image, caption) in enumerate(records):
      for ext, data in (("jpg", image), ("txt", caption.encode())):
        info = tarfile.TarInfo(f"{i:06d}.{ext}")
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))
  return parquet, tar, sum(len(b) for b, _ in records)


def _command(fmt: str, path: str, out: str, workers: int) -> list:
  return [sys.executable, "-m", "nmm_jax.data.cli", "write", f"--from={fmt}", f"--out={out}",
          f"--workers={workers}", "--num_shards=8", path]


def _measure(command: list):
  """Runs `command` as this process's only child: its peak resident set (and its workers') is
  then this process's RUSAGE_CHILDREN maximum, printed last."""
  result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
  if result.returncode:
    raise SystemExit(f"conversion failed:\n{result.stderr[-3000:]}")
  print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def convert(fmt: str, path: str, out: str, workers: int) -> dict:
  start = time.perf_counter()
  result = subprocess.run([sys.executable, __file__, "--_measure", *_command(fmt, path, out,
                                                                            workers)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
  seconds = time.perf_counter() - start
  if result.returncode:
    raise SystemExit(f"{fmt}: {result.stderr[-3000:]}")
  with open(os.path.join(out, "caption", "manifest.json")) as f:
    manifest = json.load(f)
  return {"seconds": seconds, "documents": sum(manifest["documents"].values()),
          "skipped": sum(manifest["skipped"].values()),
          "peak_rss_mib": int(result.stdout.split()[-1]) / 1024}


def main():
  if sys.argv[1:2] == ["--_measure"]:
    return _measure(sys.argv[2:])
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--photos", type=int, default=2000)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--row_group", type=int, default=64)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix="nmm-bench-import-") as folder:
    parquet, tar, image_bytes = write_inputs(folder, args.photos, args.row_group)
    groups = pq.ParquetFile(parquet).metadata.num_row_groups
    print(f"{args.photos} photos, {image_bytes / 2**20:.1f} MiB of JPEG; Parquet "
          f"{os.path.getsize(parquet) / 2**20:.1f} MiB in {groups} row groups of "
          f"{args.row_group}; tar {os.path.getsize(tar) / 2**20:.1f} MiB; "
          f"{args.workers} workers, {os.cpu_count()} cores")
    for fmt, path in (("parquet", parquet), ("webdataset", tar)):
      r = convert(fmt, path, os.path.join(folder, f"out-{fmt}"), args.workers)
      print(f"{fmt:10s}  {r['documents']} docs ({r['skipped']} skipped) in {r['seconds']:.1f} s"
            f"  {r['documents'] / r['seconds']:.0f} docs/s  "
            f"{os.path.getsize(path) / 2**20 / r['seconds']:.1f} MiB/s  "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
  main()
