"""Tests of the benchmark scripts: arguments, tables, target rows, the decode-step harness on a tiny model (no timing asserted)."""
import os
import subprocess

import jax
import numpy as np
import pytest

from benchmarks import bench_lib
from benchmarks import data_scale
from benchmarks import decode_steps
from benchmarks import gpu_bench
from benchmarks import quality
from benchmarks import targets
from benchmarks import throughput
from calm_jax.stages import build_model
from experiments import ar_baseline

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


def test_targets_pass_fail_rows():
  models = {"ar": _model(1, 100.0, 4e6, 10.0), "calm_k4": _model(4, 150.0, 2e6, 50.0)}
  steps = lambda small, large: {"b1": {"256": small, "4096": large},
                                "b32": {"256": small, "4096": large}}
  result = {"size": "tiny", "machine": {"backend": "cpu"}, "models": models,
            "ratios": throughput.ratios(models),
            "decode_step_s": {"ar": steps(1.0, 1.2), "calm_k4": steps(1.0, 2.0)},
            "flops_per_token_compiled": {"M": {"ar": 3e9, "calm_k4": 1e9}}}
  rows = {r["target"]: r for r in targets.target_rows(result)}
  assert rows["AR decode step 4096 / 256 slots, b32"]["status"] == "pass"
  assert rows["CALM K=4 decode step 4096 / 256 slots, b1"]["status"] == "fail"
  assert rows["CALM K=4 generation tokens/s / AR, b1, T=1"]["measured"] == pytest.approx(5.0)
  assert rows["FLOPs/token CALM K=4 / AR at tiny (XLA's count, unrolled)"]["status"] == "pass"
  assert rows["FLOPs/token CALM K=4 / AR at M (XLA's count, unrolled)"]["measured"] == pytest.approx(1 / 3)
  assert rows["CALM K=4 train tokens/s / AR at tiny on CPU"]["status"] == "pass"
  assert rows["AR-M MFU on the H200 (bf16)"]["status"] == "not measured"
  table = targets.format_rows(list(rows.values()))
  assert table.count("\n") == len(rows) + 1 and "| fail |" in table
  text = throughput.tables(dict(result, targets=list(rows.values())))
  assert "decode step ms (64 positions filled)" in text and "4096 slots" in text


def test_decode_steps_time_the_model_extend():
  """The decode-step harness runs a real (tiny) model's donated extend at each cache size."""
  config = ar_baseline.get_config("size=tiny")
  config.model.update(vocab_size=48, hidden=32, mlp=64, layers=2, heads=4, kv_heads=2)
  model = build_model(config)
  tokens = np.zeros((1, 4), np.int32)
  params = jax.jit(model.init, static_argnames="train")(
      {"params": jax.random.key(0, impl="unsafe_rbg")},
      {"tokens": tokens, "mask": np.ones_like(tokens)}, train=False)["params"]
  out = decode_steps.measure(model, params, 0, (1,), (16,), steps=2, fill=4)   # 2 cells in turns
  assert out["decode_step_s"]["b1"]["16"] > 0 and out["decode_step_full_s"]["b1"]["16"] > 0
  with pytest.raises(ValueError, match="do not fit 16 slots"):
    decode_steps.time_steps(model, params, 0, 1, [(32, 4), (16, 13)], 2)


def test_gpu_check_script_and_driver_arguments():
  script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.sh")
  assert subprocess.run(["bash", "-n", script], check=False).returncode == 0
  args = gpu_bench.parse_args(["--output", "x.json", "--dry_run"])
  assert args.dry_run and args.steps == 1 and args.batch_size == 2
  assert gpu_bench.parse_args(["--output", "x.json"]).steps == 5
  assert {name for name, *_ in gpu_bench.RUNS} == {"autoencoder_base", "ar_S", "ar_M", "calm_M"}


def test_quality_budgets():
  args = quality.parse_args(["--budget", "tiny", "--data_dir", "/data"])
  assert args.budget_name == "tiny" and args.preset["flops"] == quality.BUDGETS["tiny"]["flops"]
  assert args.train == "jsonl:/data/corpus/train-*.jsonl"
  assert args.valid == "jsonl:/data/corpus/valid.jsonl"
  assert args.wikitext == "jsonl:/data/wikitext103/test.jsonl"
  assert args.output.endswith("quality_tiny.json")
  assert (args.K, args.latent_dim, args.suffix) == (2, 64, "")
  config = quality.stage2_config("calm_energy", args)
  assert (config.model.patch_size, config.model.latent_dim) == (2, 64)
  assert config.train.ema_decay == 0.99                            # the tiny recipe's params EMA
  args = quality.parse_args(["--budget", "medium", "--K", "4"])   # runs and JSON apart from K=2
  assert (args.latent_dim, args.suffix) == (128, "_K4")
  assert args.output.endswith("quality_medium_K4.json")
  config = quality.stage2_config("calm_energy_K4", args)
  assert (config.model.head, config.model.patch_size, config.model.latent_dim) == ("energy", 4, 128)
  args = quality.parse_args(["--budget", "3e12", "--wikitext", "none", "--heads", "energy"])
  assert args.budget_name == "flops_3e+12" and args.preset["flops"] == 3e12
  assert args.wikitext == "" and args.heads == ["energy"]
  assert quality.parse_args([]).budget_name == "small"
  with pytest.raises(SystemExit):
    quality.parse_args(["--budget", "huge"])
  with pytest.raises(SystemExit):
    quality.parse_args(["--heads", "gan"])


def test_time_in_turns_alternates_the_calls():
  order = []
  times = bench_lib.time_in_turns([lambda: order.append("a"), lambda: order.append("b")], 1, 3)
  assert order == ["a", "b"] * 4 and [len(t) for t in times] == [3, 3]
  assert bench_lib.dig({"a": {"b": 2}}, "a", "b") == 2 and bench_lib.dig({"a": 1}, "a", "b") is None
  assert bench_lib.ratio(1.0, 4.0) == 0.25 and bench_lib.ratio(None, 1.0) is None


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
