"""Evaluation of a real short training run on the shapes data: the caption accuracy logged during
training beats chance, and the console scripts (nmm-generate, nmm-eval) work on its checkpoint
and agree with the library."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from nmm_jax.eval import captions, held_out, zero_shot
from nmm_jax.eval.run_model import load_run
from nmm_jax.train.loop import train_and_evaluate

STEPS = 100


@pytest.fixture(scope="module")
def run(shapes_data_dir, tmp_path_factory):
  """(workdir, logged records) of a 100-step caption-only tiny run, fixed seed."""
  workdir = str(tmp_path_factory.mktemp("captions_run"))
  config = tiny_config(**{"data.dir": shapes_data_dir, "data.mixture": {"caption": 1.0},
                          "train.steps": STEPS, "train.log_every": 50, "eval.every_steps": 50,
                          "eval.captions": 32, "checkpoint.every_steps": STEPS})
  return workdir, train_and_evaluate(config, workdir)


def _cli(*args):
  out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL)
  return out


def test_training_beats_chance_on_caption_attributes(run):
  _, records = run
  evals = [r for r in records if "eval/caption/colour" in r]
  assert [r["step"] for r in evals] == [50, STEPS]
  final = evals[-1]
  margins = {a: final[f"eval/caption/{a}"] - captions.CHANCE[a] for a in captions.ATTRIBUTES}
  # Colour is the first thing it sees (chance 0.2); measured 1.0 at step 100.
  assert margins["colour"] >= 0.4, final
  assert max(margins.values()) >= 0.4 and final["eval/caption/all"] >= 0


def test_parse_caption():
  assert captions.parse_caption("two red circles on the left .") == {
      "colour": "red", "shape": "circle", "count": 2, "region": "left"}
  assert captions.parse_caption("one blue square at the") == {
      "colour": "blue", "shape": "square", "count": 1, "region": None}
  assert captions.parse_caption("") == dict.fromkeys(captions.ATTRIBUTES)


def test_generate_cli_captions_and_scores_like_the_library(run, shapes_data_dir, tmp_path):
  workdir, _ = run
  model = load_run(workdir)
  example = held_out.caption_examples(shapes_data_dir, "caption", model.image_size, 1)[0]
  image = str(tmp_path / "picture.png")
  Image.fromarray(example.image).save(image)

  out = _cli("nmm_jax.eval.cli.generate", f"--workdir={workdir}", f"--image={image}",
             "--max-new-tokens=12")
  assert out.returncode == 0, out.stderr
  [caption] = out.stdout.splitlines()
  assert caption == model.generate([model.sequence(example.image[None])], 12)[0].text
  assert caption.endswith(".") and captions.parse_caption(caption)["colour"] is not None

  out = _cli("nmm_jax.eval.cli.generate", f"--workdir={workdir}", f"--image={image}",
             f"--score={example.caption}", "--eos")
  assert out.returncode == 0, out.stderr
  scored = json.loads(out.stdout)
  ids, logprobs = model.score([model.sequence(example.image[None], example.caption, eos=True)])[0]
  assert scored["tokens"] == ids.tolist() and scored["step"] == STEPS
  np.testing.assert_allclose(scored["logprobs"], logprobs, rtol=1e-6)
  assert " ".join(scored["pieces"][:-1]) == example.caption

  # Sampling: several samples in one batch, reproducible by seed.
  args = ("nmm_jax.eval.cli.generate", f"--workdir={workdir}", f"--image={image}",
          "--max_new_tokens=8", "--temperature=1.5", "--top_p=0.95", "--num_samples=4",
          "--seed=3")
  first, again = _cli(*args), _cli(*args)
  assert first.returncode == 0, first.stderr
  assert len(first.stdout.splitlines()) == 4 and first.stdout == again.stdout


def test_eval_cli_reports_caption_accuracy_and_zero_shot(run, shapes_data_dir):
  workdir, records = run
  out = _cli("nmm_jax.eval.cli", "captions", f"--workdir={workdir}", "--num=32", "--show=2")
  assert out.returncode == 0, out.stderr
  report = json.loads(out.stdout)
  # The same 32 pictures as the last eval during training, the same parameters.
  assert report["accuracy"] == {k[len("eval/caption/"):]: v for k, v in records[-1].items()
                                if k.startswith("eval/caption/")}
  assert report["pictures"] == 32 and len(report["examples"]) == 2

  out = _cli("nmm_jax.eval.cli", "zero-shot", f"--workdir={workdir}", "--source=caption",
             "--num=24", "--batch_size=32")
  assert out.returncode == 0, out.stderr
  report = json.loads(out.stdout)
  model = load_run(workdir)
  examples = held_out.caption_examples(shapes_data_dir, "caption", model.image_size, 24)
  result = zero_shot.zero_shot_accuracy(model, examples, batch_size=32)
  assert report["accuracy"] == result.accuracy and report["chance"] == result.chance
  # Every prediction is the best-scoring candidate of its image.
  scores = zero_shot.classify(model, np.stack([e.image for e in examples[:3]]),
                              result.candidates)
  assert scores.argmax(1).tolist() == result.predictions[:3]
  assert result.accuracy > 2 * result.chance


def test_bad_input_ends_in_one_line(run, tmp_path):
  workdir, _ = run
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not an image")
  cases = [
      (("nmm_jax.eval.cli.generate", f"--workdir={workdir}", f"--image={broken}"),
       "broken.png: not a readable image"),
      (("nmm_jax.eval.cli.generate", f"--workdir={tmp_path}"), "no checkpoints/ folder"),
      (("nmm_jax.eval.cli.generate", f"--workdir={workdir}", "--step=7"),
       "no checkpoint at step 7"),
      (("nmm_jax.eval.cli.generate", f"--workdir={workdir}", "--temperature=-1"),
       "temperature=-1.0 must be >= 0"),
      (("nmm_jax.eval.cli", "zero-shot", f"--workdir={workdir}", "--source=nothing"),
       "holds no eval-*.array_record shards"),
  ]
  for args, message in cases:
    out = _cli(*args)
    assert out.returncode != 0 and message in out.stderr, (args, out.stderr)
    assert "Traceback" not in out.stderr
