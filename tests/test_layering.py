"""The package's imports follow the layering written in WORKSPACE.md ("Layers"): a module imports
only modules of lower layers or of its own package in its layer; command-line modules sit on top,
import flag-free modules (and their own cli/ folder's helpers), and nothing else imports them."""
import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASE_LAYERS = 1  # layers every command may import (config, the mesh vocabulary, the machine)
# Commands whose job reaches past their own package (WORKSPACE.md says why).
COMMANDS_BEYOND_THEIR_PACKAGE = {
    "bench": "nmm-bench times the train program on synthetic batches",
    "data.cli.bench": "nmm-data bench runs the training loop to measure its data wait",
    "checkpoint_cli": "nmm-checkpoints verify reads a run's checkpoints through checkpoint.py",
}
PACKAGE = ROOT / "nmm_jax"


def _layers() -> dict:
  """{module prefix: layer} from WORKSPACE.md's table of layers."""
  text = (ROOT / "WORKSPACE.md").read_text()
  section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
  layers = {}
  for rank, modules in re.findall(r"^\| (\d+) \| ([^|]+) \|", section, re.M):
    for name in re.findall(r"`([\w.]+)`", modules):
      layers[name] = int(rank)
  assert layers, "WORKSPACE.md has no table of layers"
  return layers


def _modules() -> dict:
  """{dotted module name below nmm_jax: source}."""
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path.read_text()
  return out


def _imports(name: str, source: str, modules: dict) -> set:
  """The nmm_jax modules `name` imports (below nmm_jax, dotted); `from pkg import module` counts
  as importing the module."""
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nmm_jax"):
      base = node.module[len("nmm_jax."):] if node.module != "nmm_jax" else ""
      for alias in node.names:
        child = f"{base}.{alias.name}".strip(".")
        found.add(child if child in modules else base)
    elif isinstance(node, ast.Import):
      found.update(a.name[len("nmm_jax."):] for a in node.names if a.name.startswith("nmm_jax."))
  found.discard("")  # `import nmm_jax` / `from nmm_jax import __version__`: the package itself
  found.discard(name)
  return found


_CACHE = {}


def _modules_cache():
  if "modules" not in _CACHE:
    _CACHE["modules"] = _modules()
  return _CACHE["modules"]


def is_cli(name: str, source: str) -> bool:
  """A command-line module: a __main__, a module of a cli/ folder, or one that defines flags."""
  parts = name.split(".")
  return (parts[-1] == "__main__" or "cli" in parts[:-1] or parts[-1] == "cli"
          or re.search(r"\bflags\.DEFINE_|config_flags\.DEFINE_", source) is not None)


def _layer_of(name: str, layers: dict) -> int:
  prefixes = [p for p in layers if name == p or name.startswith(p + ".")]
  assert prefixes, f"nmm_jax.{name} is in no layer of WORKSPACE.md's table"
  return layers[max(prefixes, key=len)]


def _package(name: str) -> str:
  return name.split(".")[0]


def _cli_folder(name: str) -> str:
  parts = name.split(".")
  return ".".join(parts[:parts.index("cli") + 1]) if "cli" in parts else name


def violations(modules: dict, layers: dict) -> list:
  wrong = []
  for name, source in modules.items():
    cli = is_cli(name, source)
    for target in sorted(_imports(name, source, modules)):
      if target not in modules:
        wrong.append(f"{name} imports nmm_jax.{target}, which does not exist")
      elif is_cli(target, modules[target]):
        if not (cli and _cli_folder(target) == _cli_folder(name) and "cli" in name.split(".")):
          wrong.append(f"{name} imports the command-line module {target}")
      elif not cli:
        mine, theirs = _layer_of(name, layers), _layer_of(target, layers)
        if theirs > mine or (theirs == mine and _package(target) != _package(name)):
          wrong.append(f"{name} (layer {mine}) imports {target} (layer {theirs})")
      elif (_package(target) != _package(name) and _layer_of(target, layers) > BASE_LAYERS
            and name not in COMMANDS_BEYOND_THEIR_PACKAGE):
        wrong.append(f"the command {name} imports {target}: a command imports its own "
                     f"package's flag-free modules (move what it needs there)")
  return wrong


def test_imports_follow_the_layers():
  wrong = violations(_modules_cache(), _layers())
  assert not wrong, "imports against WORKSPACE.md's layers:\n" + "\n".join(wrong)


def test_every_module_is_in_a_layer():
  layers = _layers()
  for name, source in _modules_cache().items():
    if name and not is_cli(name, source):
      _layer_of(name, layers)


def test_the_checker_reports_what_breaks_the_layers():
  layers = {"config": 1, "models": 2, "data": 2, "train": 3, "eval": 5}
  modules = {
      "config": "from nmm_jax.train import loss\n",         # up
      "models.nmm": "import nmm_jax.data.records\n",        # sideways, another package
      "data.records": "from nmm_jax import config\n",       # down: fine
      "train.loss": "from nmm_jax.models import nmm\n",     # down: fine
      "eval.cli.run": "from absl import flags\nflags.DEFINE_string('x', '', '')\n"
                      "from nmm_jax.train import loss\n",    # a command beyond its package
      "eval.score": "from nmm_jax.eval.cli import run\n",   # imports a command
  }
  assert violations(modules, layers) == [
      "config (layer 1) imports train.loss (layer 3)",
      "models.nmm (layer 2) imports data.records (layer 2)",
      "the command eval.cli.run imports train.loss: a command imports its own package's "
      "flag-free modules (move what it needs there)",
      "eval.score imports the command-line module eval.cli.run",
  ]
