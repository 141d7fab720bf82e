"""Tests of the calm-tokenizer and calm-prepare command lines: summaries and one-line errors."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from calm_jax.cli import prepare
from calm_jax.data import sources
from calm_jax.data import tokenizer as tokenizer_lib
from calm_jax.cli import tokenizer as cli_tokenizer

pytestmark = pytest.mark.e2e

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_calm_tokenizer_writes_a_model_and_prints_a_summary(tmp_path, capsys):
  output = tmp_path / "t.model"
  cli_tokenizer.run(["--data", "builtin:python_docs:valid", "--vocab_size", "320",
                       "--output", str(output), "--max_chars", "100000"])
  out = capsys.readouterr().out
  assert f"wrote {output}: 320 bpe pieces" in out and "characters/token" in out
  assert tokenizer_lib.Tokenizer.load(str(output)).vocab_size == 320


def test_calm_prepare_summary(tmp_path, tiny_tokenizer_path, capsys):
  data = tmp_path / "c.jsonl"
  data.write_text("".join(json.dumps({"text": f"doc {i} " * 20}) + "\n" for i in range(10)))
  out_dir = tmp_path / "D"
  prepare.run(["--data", f"jsonl:{data}", "--tokenizer", tiny_tokenizer_path,
               "--output", str(out_dir), "--num_workers", "1", "--part_mb", "0.0005"])
  out = capsys.readouterr().out
  assert "calm-prepare: wrote 3 shards here (10 documents," in out
  assert "complete: 10 documents" in out and "3 shards, 0 bad lines" in out
  assert len(sources.parse_spec(f"arrayrecord:{out_dir}")) == 10
  # A rerun resumes: every shard is done, nothing is written again.
  prepare.run(["--data", f"jsonl:{data}", "--tokenizer", tiny_tokenizer_path,
               "--output", str(out_dir), "--num_workers", "1", "--part_mb", "0.0005"])
  assert "wrote 0 shards here" in capsys.readouterr().out
  assert len(sources.parse_spec(f"arrayrecord:{out_dir}")) == 10
  # Another SPEC into the same directory would mix two corpora: refused.
  with pytest.raises(SystemExit):
    prepare.run(["--data", "builtin:python_docs:valid", "--tokenizer", tiny_tokenizer_path,
                 "--output", str(out_dir)])
  assert "holds shards of another prepare" in capsys.readouterr().err


@pytest.mark.parametrize("data, message", [
    ("csv:x", "Unknown data SPEC 'csv:x'"),
    ("jsonl:/nonexistent/*.jsonl", "/nonexistent/*.jsonl matches no files"),
])
def test_calm_prepare_bad_spec_exits_with_one_line(data, message, tiny_tokenizer_path, tmp_path,
                                                    capsys):
  with pytest.raises(SystemExit) as exit_info:
    prepare.run(["--data", data, "--tokenizer", tiny_tokenizer_path,
                 "--output", str(tmp_path / "D")])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1


def test_calm_prepare_malformed_jsonl_subprocess(tmp_path, tiny_tokenizer_path):
  data = tmp_path / "bad.jsonl"
  data.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": oops}\n')
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  result = subprocess.run(
      [sys.executable, "-m", "calm_jax.cli.prepare", "--data", f"jsonl:{data}", "--num_workers", "1",
       "--tokenizer", tiny_tokenizer_path, "--output", str(tmp_path / "D")],
      capture_output=True, text=True, env=env, timeout=120, check=False)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr + result.stdout
  lines = result.stderr.strip().splitlines()  # progress lines, then one error line
  errors = [line for line in lines if "error:" in line]
  assert errors == lines[-1:] and f"{data}:3: malformed JSON" in errors[0]
  # The shard written before the unit was judged is done, but a rerun judges it again.
  rerun = subprocess.run(result.args, capture_output=True, text=True, env=env, timeout=120,
                         check=False)
  assert rerun.returncode != 0 and f"{data}:3: malformed JSON" in rerun.stderr
