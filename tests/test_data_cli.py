"""The nmm-data commands end to end, as a user runs them: write -> train-tokenizer -> inspect ->
the training pipeline reads the result; bench prints its figures; bad flags fail clearly."""
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import tiny_config
from nmm_jax.data import pipeline, shards

pytest.importorskip("sklearn")


def nmm_data(*args, check=True):
  result = subprocess.run([sys.executable, "-m", "nmm_jax.data.cli", *args], capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("digits_data"))
  out = nmm_data("write", "--from=sklearn-digits", "--image_size=16", f"--out={directory}",
                 "--num_shards=2", "--workers=2", "--eval_fraction=0.05")
  assert "1707 train + 90 eval documents, 1797 images, 3 shards" in out.stdout
  assert "skipped 0" in out.stdout
  out = nmm_data("train-tokenizer", directory, "--vocab_size=64")
  assert os.path.isfile(os.path.join(directory, "tokenizer.model")), out.stdout
  return directory


def test_inspect_reports_counts_tokens_and_draws_a_contact_sheet(digits_dir, tmp_path):
  sheet = str(tmp_path / "sheet.png")
  out = nmm_data("inspect", digits_dir, f"--contact_sheet={sheet}", "--num_documents=3",
                 "--patches_per_image=4").stdout
  assert "source digits: 1797 documents, 0 unreadable records, 1797 images" in out
  assert "text tokens" in out and "tokenizer.model" in out
  with Image.open(sheet) as img:
    assert img.width == 520 and img.height > 3 * 100


def test_the_pipeline_trains_on_written_shards(digits_dir):
  config = tiny_config(**{"data.dir": digits_dir, "data.mixture": {"digits": 1.0},
                          "data.image_size": 16, "model.patch_size": 8})
  tokenizer = shards.load_tokenizer(config, digits_dir)
  batch = next(iter(pipeline.make_dataset(config, digits_dir, "eval", seed=0)))
  row = batch["tokens"][0][batch["segment_ids"][0] == 1]
  assert tokenizer.decode(row).startswith("a handwritten digit ")
  assert (row == tokenizer.image_id).sum() == 4  # one 16x16 image in 8x8 patches
  assert batch["images"].shape[2:] == (16, 16, 3)


def test_bad_flags_fail_with_one_clear_line(tmp_path):
  out = nmm_data("write", "--from=captions", f"--out={tmp_path}", check=False)
  assert out.returncode != 0 and "--from=captions needs --captions" in out.stderr
  out = nmm_data("write", "--from=sklearn-digits", "--out=gs://bucket/data", check=False)
  assert out.returncode != 0 and "writes a local folder; copy it to the bucket" in out.stderr
  out = nmm_data("inspect", str(tmp_path / "nowhere"), check=False)
  assert out.returncode != 0 and "no such file or folder" in out.stderr
  assert "Traceback" not in out.stderr
  out = nmm_data("frobnicate", check=False)
  assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr


def test_bench_prints_throughput_and_data_wait(tmp_path):
  out = nmm_data("bench", "--config=configs/tiny.py", "--workers=0,1", "--batches=3",
                 "--train_steps=4", f"--workdir={tmp_path}").stdout
  lines = [l.split() for l in out.splitlines() if l.strip()[:1].isdigit()]
  assert [l[0] for l in lines] == ["0", "1"]
  assert all(float(l[1]) > 0 and float(l[2]) > 0 for l in lines)  # sequences/s, images/s
  assert "data wait" in out and "% of step time" in out
