"""Paths in configs and checkpoints are data (issue 14 item 11): nothing they name is executed, nothing is written outside the workdir.

The code-execution half is a check of the sources (no pickle, eval/exec, yaml.load,
allow_pickle, torch.load without weights_only=True; Python config files are loaded only
by the command lines, from --config or the repository's experiments/); the write half runs the trainer and a
checkpoint manager on workdirs whose saved config and checkpoint directory point outside.
"""
import ast
import json
import os
import pathlib

import jax
import pytest

from calm_jax import checkpoint
from calm_jax import config as config_lib
from calm_jax import errors
from calm_jax.training import loop
from tests.test_reliability import _config

pytestmark = pytest.mark.faults

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "calm_jax"


def _calls():
  for path in sorted(PACKAGE.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
        keywords = {k.arg: k.value for k in node.keywords}
        yield path.relative_to(PACKAGE.parent), node.lineno, owner, name, keywords


def test_nothing_a_config_or_checkpoint_names_is_executed():
  bad = []
  for where, line, owner, name, keywords in _calls():
    true = lambda k: isinstance(keywords.get(k), ast.Constant) and keywords[k].value is True
    if (owner == "torch" and name == "load" and not true("weights_only")
        or owner in ("pickle", "cloudpickle", "dill", "marshal") and "load" in name
        or owner == "" and name in ("eval", "exec")
        or owner == "yaml" and name == "load"
        or name == "load" and true("allow_pickle")
        or name == "load_config_file" and not (str(where) == "calm_jax/config.py"
                                               or str(where).startswith("calm_jax/cli/"))):
      bad.append(f"{where}:{line} {owner}.{name}")
  assert not bad, bad


def test_a_saved_tokenizer_path_outside_the_workdir_is_never_written(tiny_tokenizer_path,
                                                                     tmp_path):
  """A rerun on the default path takes the saved tokenizer path; missing, it is an error,
  never a tokenizer trained into that path."""
  workdir, outside = tmp_path / "run", tmp_path / "outside"
  config = _config(tiny_tokenizer_path, 2, 2)
  saved = config.copy_and_resolve_references()
  saved.data.tokenizer = str(outside / "tokenizer.model")
  config_lib.save_config(saved, str(workdir))
  config.data.tokenizer = ""
  with pytest.raises(errors.UserError, match="outside/tokenizer.model"):
    loop.train_and_evaluate(config, str(workdir), jax.devices()[:1])
  assert not outside.exists()
  assert json.loads((workdir / config_lib.CONFIG_FILE).read_text())["data"]["tokenizer"] == str(
      outside / "tokenizer.model")


def test_a_checkpoint_directory_linking_outside_is_not_followed(tmp_path):
  """A temporary step directory that is a symlink out of the workdir: the cleanup of
  half-written steps removes nothing outside."""
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "precious.txt").write_text("keep")
  ckpt_dir = pathlib.Path(checkpoint.checkpoint_dir(str(tmp_path / "run")))
  ckpt_dir.mkdir(parents=True)
  os.symlink(outside, ckpt_dir / "5.orbax-checkpoint-tmp-1700000000")
  ckpt = checkpoint.Checkpointer(str(tmp_path / "run"))
  assert ckpt.all_steps() == []
  ckpt.close()
  assert (outside / "precious.txt").read_text() == "keep"
