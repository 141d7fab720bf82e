"""calm-prepare --runner beam on Beam's local DirectRunner writes the local runner's shards (needs '.[beam]')."""
import json
import os

import pytest

from calm_jax.cli import prepare as cli_prepare
from calm_jax.data import prepare
from calm_jax.data import sources

pytestmark = pytest.mark.integration


def test_beam_direct_runner_writes_the_same_shards(tmp_path, tiny_tokenizer_path, capsys):
  pytest.importorskip("apache_beam")
  spec = "builtin:python_docs:valid,builtin:python_docs:train"  # 2 units, 2 Beam elements
  local = prepare.prepare(spec, tiny_tokenizer_path, str(tmp_path / "local"), part_docs=200)
  cli_prepare.run(["--data", spec, "--tokenizer", tiny_tokenizer_path, "--output",
                   str(tmp_path / "beam"), "--runner", "beam", "--part_docs", "200",
                   "--runner_flags=--runner=DirectRunner"])
  assert "complete" in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path / "beam")) == sorted(os.listdir(tmp_path / "local"))
  read = lambda d: [r.tolist() for r in (lambda s: [s[i] for i in range(len(s))])(
      sources.parse_spec(f"arrayrecord:{tmp_path / d}"))]
  assert read("beam") == read("local")
  with open(tmp_path / "beam" / prepare.SUMMARY_FILE) as f:
    assert json.load(f)["tokens"] == local["total"]["tokens"]
