"""Smoke tests of the benchmark scripts' argument parsing and tables (no timing, nothing compiled)."""
import os

import pytest

from benchmarks import bench_lib
from benchmarks import data_scale
from benchmarks import quality
from benchmarks import throughput

pytestmark = pytest.mark.integration


def test_throughput_defaults():
  args = throughput.parse_args([])
  assert args.size == "tiny" and args.dtype == "float32"
  assert args.ks == [1, 2, 4, 8] and args.gen_ks == [4]
  assert args.gen_batches == [1, 32] and args.gen_tokens == 256
  assert args.batch_size == 0
  assert args.output.endswith(os.path.join("benchmarks", "throughput_tiny.json"))


def test_throughput_gpu_flags():
  args = throughput.parse_args(["--size", "M", "--dtype", "bfloat16", "--ks", "4",
                                "--peak_tflops", "990", "--output", "x.json"])
  assert args.batch_size == 16 and args.ks == [4] and args.output == "x.json"
  with pytest.raises(SystemExit):
    throughput.parse_args(["--ks", "0"])
  with pytest.raises(SystemExit):
    throughput.parse_args(["--gen_tokens", "250", "--ks", "8"])


def _model(k, tokens_per_s, flops_per_token, gen):
  entry = {"K": k, "params": {"backbone": 10, "head": 2, "compression": 3,
                              "frozen_autoencoder": 0 if k == 1 else 5, "trainable": 15},
           "train": {"tokens_per_s": tokens_per_s, "flops_per_token": flops_per_token,
                     "step_time_s": 0.5}}
  entry["generate"] = {"b1": {"T=1": {"tokens_per_s": gen}, "T=1/2": {"tokens_per_s": gen / 2}},
                       "b32": {"T=1": {"tokens_per_s": 8 * gen},
                               "T=1/2": {"tokens_per_s": 4 * gen}}}
  return entry


def test_throughput_ratios_and_tables():
  models = {"ar": _model(1, 100.0, 4e6, 10.0), "calm_k4": _model(4, 300.0, 1e6, 50.0)}
  r = throughput.ratios(models)
  assert r["train_tokens_per_s"] == pytest.approx(3.0)
  assert r["flops_per_token"] == pytest.approx(0.25)
  assert r["generate_tokens_per_s_b1"] == pytest.approx(5.0)
  assert r["generate_tokens_per_s_b32"] == pytest.approx(5.0)
  text = throughput.tables({"models": models, "ratios": r})
  assert "CALM K=4" in text and "x AR" in text and "gen b32 T=1/2 tok/s" in text
  assert throughput.ratios({"ar": models["ar"]})["train_tokens_per_s"] is None


def test_quality_budgets():
  args = quality.parse_args(["--budget", "tiny", "--data_dir", "/data"])
  assert args.budget_name == "tiny" and args.preset["flops"] == quality.BUDGETS["tiny"]["flops"]
  assert args.train == "jsonl:/data/corpus/train-*.jsonl"
  assert args.valid == "jsonl:/data/corpus/valid.jsonl"
  assert args.wikitext == "jsonl:/data/wikitext103/test.jsonl"
  assert args.output.endswith("quality_tiny.json")
  args = quality.parse_args(["--budget", "3e12", "--wikitext", "none", "--heads", "energy"])
  assert args.budget_name == "flops_3e+12" and args.preset["flops"] == 3e12
  assert args.wikitext == "" and args.heads == ["energy"]
  assert quality.parse_args([]).budget_name == "small"
  with pytest.raises(SystemExit):
    quality.parse_args(["--budget", "huge"])
  with pytest.raises(SystemExit):
    quality.parse_args(["--heads", "gan"])


def test_format_table():
  text = bench_lib.format_table(["a", "bb"], [[1, "xyz"], ["long", 2]])
  lines = text.splitlines()
  assert len(lines) == 4 and len({len(line) for line in lines}) == 1
  assert bench_lib.fmt(None) == "-" and bench_lib.fmt(1234567, ",") == "1,234,567"


def test_data_scale_defaults_and_a_tiny_corpus(tmp_path):
  args = data_scale.parse_args([])
  assert args.gb == 2 and args.dir.startswith("/tmp") and args.prepare_timeout == 0
  assert args.output.endswith(os.path.join("benchmarks", "data_scale_2gb.json"))
  path = tmp_path / "c.jsonl.zst"
  made = data_scale.generate(str(path), gb=0.0002, pool_mb=0.05)
  from calm_jax.data import sources  # pylint: disable=g-import-not-at-top
  texts = list(sources.parse_spec(f"jsonl:{path}").texts())
  assert len(texts) == made["documents"] and made["uncompressed_bytes"] >= 200_000
  assert texts[0].split()[0] == "0" and texts[-1].split()[0] == str(len(texts) - 1)
