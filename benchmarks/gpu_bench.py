r"""The GPU check's measurements, one JSON: versions, train steps of the autoencoder, AR and CALM in bf16 (tokens/s, MFU), decode steps at 256 and 4,096 slots.

  python benchmarks/gpu_bench.py --output gpu_check.json        # on the GPU (gpu_check.sh)
  python benchmarks/gpu_bench.py --dry_run --output /tmp/g.json  # any CPU: tiny sizes, 1 step

Every train step is the experiment's own program (scanned layers: compiles in seconds at
any depth), timed as the median of --steps steps after 2 warm-up steps; FLOPs per token
are the analytic count (calm_jax/models/flops.py; XLA's cost analysis counts a scanned
layer once and an unrolled compile takes minutes at size M); MFU is against the chip's
dense bf16 peak (calm_jax/parallel/peak.py, --peak_tflops overrides). The attention kernel
of the training path (cuDNN on the GPU) is compared with XLA's on one bf16 batch. The
JSON is rewritten after every measurement, so a run cut short keeps what it measured.
"""
import argparse
import importlib.metadata
import os
import platform
import sys
import time

if __package__ in (None, ""):         # `python benchmarks/gpu_bench.py`: the repo root on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from benchmarks import bench_lib  # pylint: disable=g-import-not-at-top
from benchmarks import decode_steps  # pylint: disable=g-import-not-at-top
from calm_jax import stages  # pylint: disable=g-import-not-at-top
from calm_jax.models import attention  # pylint: disable=g-import-not-at-top
from calm_jax.parallel import peak  # pylint: disable=g-import-not-at-top
from calm_jax.parallel import sharding  # pylint: disable=g-import-not-at-top

# (name, experiment, size, K) of the train-step runs; decode steps for the ones in DECODE.
RUNS = (("autoencoder_base", "autoencoder", "base", 4), ("ar_S", "ar_baseline", "S", None),
        ("ar_M", "ar_baseline", "M", None), ("calm_M", "calm", "M", 4))
DRY_RUNS = (("autoencoder_tiny", "autoencoder", "tiny", 4),
            ("ar_tiny", "ar_baseline", "tiny", None), ("calm_tiny", "calm", "tiny", 4))
DECODE = ("ar_M", "calm_M", "ar_tiny", "calm_tiny")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "ml-dtypes",
            "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "jax-cuda12-pjrt")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--output", required=True, help="the JSON written")
  p.add_argument("--dry_run", action="store_true",
                 help="tiny sizes, float32, 1 step: checks the script on a CPU in a minute")
  p.add_argument("--batch_size", type=int, default=16, help="sequences per train step")
  p.add_argument("--steps", type=int, default=5, help="timed train steps (median)")
  p.add_argument("--peak_tflops", type=float, default=0.0, help="overrides the peak table")
  args = p.parse_args(argv)
  if args.dry_run:
    args.batch_size, args.steps = 2, 1
  return args


def versions():
  """Python, the packages that matter and the devices, for the JSON's head."""
  out = {"python": platform.python_version(), "platform": platform.platform(),
         "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
         "device_kind": jax.devices()[0].device_kind}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def _configs(experiment, size, k):
  variants = {"size": size} if k is None or experiment == "ar_baseline" else {"size": size, "K": k}
  config = bench_lib.load(experiment, **variants)
  return config, (bench_lib.autoencoder_for(config, size) if experiment == "calm" else None)


def train_step(name, experiment, size, k, args, dtype):
  """Median step time, tokens/s, analytic FLOPs per token and MFU of one model's train step."""
  config, ae_config = _configs(experiment, size, k)
  bench_lib.set_shape(config, dtype, args.batch_size, 64 if args.dry_run else 0)
  if ae_config is not None:
    ae_config.train.compute_dtype = dtype
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config)
  with sharding.activate(mesh, rules):
    bench = bench_lib.TrainBench(config, ae_config, mesh, rules, count_flops=False)
    times = bench.time_steps(2, args.steps)
  tokens = config.train.batch_size * config.data.seq_len
  step_s = bench_lib.median(times)
  per_token = stages.train_flops_per_token(config, ae_config.model if ae_config else None)
  out = {"size": size, "batch_size": config.train.batch_size, "seq_len": config.data.seq_len,
         "compile_s": bench.compile_s, "step_time_s": step_s, "step_times_s": times,
         "tokens_per_s": tokens / step_s, "flops_per_token": per_token["total"],
         "flops_per_token_parts": per_token, "params": bench.params}
  devices = jax.devices()
  if args.peak_tflops:
    out["mfu"] = per_token["total"] * out["tokens_per_s"] / (args.peak_tflops * 1e12 * len(devices))
  else:
    out["mfu"] = peak.mfu(per_token["total"], out["tokens_per_s"], devices[0].device_kind,
                          len(devices))
  mfu = "-" if out["mfu"] is None else f"{100 * out['mfu']:.1f}%"
  print(f"  {name}: {out['tokens_per_s']:,.0f} tokens/s, step {step_s:.4f} s, compile "
        f"{bench.compile_s:.1f} s, MFU {mfu}", flush=True)
  return out, bench


def attention_kernels(dtype):
  """Max |cuDNN - XLA| of the training attention on one batch (XLA vs XLA on a CPU)."""
  rs = np.random.RandomState(0)
  q, k, v = (jnp.asarray(rs.randn(2, 256, 8, 64), dtype) for _ in range(3))
  chosen = attention.dot_product_attention(q, k, v, is_causal=True)
  xla = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  diff = jnp.max(jnp.abs(chosen.astype(jnp.float32) - xla.astype(jnp.float32)))
  return {"implementation": attention._implementation(q, k, False) or "xla",  # pylint: disable=protected-access
          "max_abs_diff": float(diff)}


def run(args):
  dtype = "float32" if args.dry_run else "bfloat16"
  result = {"benchmark": "gpu_check", "dry_run": args.dry_run, "dtype": dtype,
            "versions": versions(), "train": {}, "decode_step_s": {}, "decode_step_full_s": {}}
  print("versions:", result["versions"], flush=True)
  start = time.perf_counter()
  result["attention_kernels"] = attention_kernels(jnp.bfloat16)
  bench_lib.write_json(args.output, result)
  for name, experiment, size, k in (DRY_RUNS if args.dry_run else RUNS):
    result["train"][name], bench = train_step(name, experiment, size, k, args, dtype)
    bench_lib.write_json(args.output, result)
    if name in DECODE:
      decode = decode_steps.measure(bench.parts["model"], bench.inference_params(),
                                    0 if experiment == "ar_baseline" else k, (1, 32),
                                    (256, 4096), steps=2 if args.dry_run else 8)
      for key in ("decode_step_s", "decode_step_full_s"):
        result[key][name] = decode[key]
      bench_lib.write_json(args.output, result)
    del bench
  result["wall_s"] = time.perf_counter() - start
  return bench_lib.write_json(args.output, result)


def main(argv=None):
  print("wrote", run(parse_args(argv)))


if __name__ == "__main__":
  main()
