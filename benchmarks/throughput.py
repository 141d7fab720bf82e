r"""Throughput benchmark: the AR baseline vs CALM (K = 1, 2, 4, 8, energy head) on the same backbone.

  python benchmarks/throughput.py [--size tiny|M|L] [--dtype float32|bfloat16] \
      [--output FILE] [--ks 1,2,4,8] [--steps 10] [--peak_tflops 990] [--count_flops_sizes M]

Measures, for randomly initialised params (CALM also gets a random frozen
autoencoder of the matching K from experiments/autoencoder.py: speed does not
depend on trained weights):
  * train step: tokens/s = batch x seq_len / median step time (after `--warmup`
    untimed steps) of the experiment's own program (scanned layers), FLOPs per
    token = XLA cost analysis of the compiled step / tokens per step (counted on
    an unrolled copy: XLA counts a loop body once; CALM's count includes the
    frozen encoder that makes its targets) beside the analytic count
    (calm_jax/models/flops.py), and MFU against --peak_tflops or the device's peak
    (calm_jax/parallel/peak.py; none on a CPU);
  * decode steps (benchmarks/decode_steps.py): decode_step_s[model][batch][cache_len], one
    donated KV-cache step of AR and CALM K=4 with caches of --cache_lens slots (64 positions
    filled), and decode_step_full_s with the cache nearly full;
  * --count_flops_sizes M: XLA's FLOPs per token of AR and CALM K=4 at other sizes (an
    unrolled step compiled at batch 1, not run);
  * parameters: backbone (transformer) / head (energy head, or the AR lm_head) /
    compression (token embedding + CALM's input MLP) / frozen autoencoder;
  * generation (calm_jax.sampling.decode, KV cache, one jitted loop): tokens/s of a
    --gen_tokens continuation of a 16-token prompt at each --gen_batches, CALM at
    T = 1 (one head draw per chunk) and T = 1/2 (batch approximation over
    --batch_approx_samples draws, default config.sampling's), the AR baseline at
    T = 1 and 1/2 (softmax of logits / T).
    tokens/s = rows x loop steps x K / median seconds; the loop stops once every
    row has emitted EOS, so the first seed whose loop runs its full length is timed.
All models are compiled first and timed in turns (one train step, or one generation, of
each per round), so a change in a shared machine's load falls on AR and CALM alike.
Prints the tables with CALM/AR ratios and the issue-15 targets as pass/fail rows
(benchmarks/targets.py) and writes JSON (rewritten after every measurement, so a run cut
short keeps what it measured). `ratios` holds CALM K=4 over AR. Timings on a shared,
loaded CPU are noisy: the JSON keeps every step time and the host load average.
"""
import argparse
import os
import sys

if __package__ in (None, ""):         # `python benchmarks/throughput.py`: the repo root on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from benchmarks import bench_lib  # pylint: disable=g-import-not-at-top
from benchmarks import decode_steps  # pylint: disable=g-import-not-at-top
from benchmarks import targets  # pylint: disable=g-import-not-at-top
from calm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
from calm_jax import stages  # pylint: disable=g-import-not-at-top
from calm_jax.parallel import peak  # pylint: disable=g-import-not-at-top
from calm_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
from calm_jax.sampling import decode  # pylint: disable=g-import-not-at-top

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT_LEN = 16
# The benchmark models use calm-tokenizer's SentencePiece ids.
SPECIAL = decode.SpecialIds(eos=tokenizer_lib.EOS_ID, pad=tokenizer_lib.PAD_ID)
# (label, temperature, CALM sampling method); AR uses the same temperatures.
GEN_SETTINGS = (("T=1", 1.0, "batch_approx"), ("T=1/2", 0.5, "batch_approx"))
RATIO_K = 4
MAX_SEED_TRIES = 20


def int_list(text):
  values = [int(v) for v in text.split(",") if v.strip()]
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"{text!r}: give positive integers separated by commas.")
  return values


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", default="tiny", choices=bench_lib.SIZES,
                 help="backbone size (experiments/common.BACKBONES); tiny runs on a CPU.")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype (params stay float32).")
  p.add_argument("--output", default=None,
                 help="JSON output (default: benchmarks/throughput_<size>.json).")
  p.add_argument("--ks", type=int_list, default=[1, 2, 4, 8], help="CALM chunk sizes K.")
  p.add_argument("--gen_ks", type=int_list, default=[RATIO_K],
                 help="CALM chunk sizes whose generation is timed (K=1 at T=1/2, batch 32 takes "
                      "minutes on a CPU).")
  p.add_argument("--batch_size", type=int, default=0,
                 help="train batch (0: the experiment's for tiny, 16 for M/L).")
  p.add_argument("--seq_len", type=int, default=0, help="train sequence length (0: the experiment's).")
  p.add_argument("--steps", type=int, default=10, help="timed train steps per model (median).")
  p.add_argument("--warmup", type=int, default=2, help="untimed train steps after compiling.")
  p.add_argument("--gen_tokens", type=int, default=256, help="new tokens per continuation.")
  p.add_argument("--gen_batches", type=int_list, default=[1, 32], help="generation batch sizes.")
  p.add_argument("--gen_repeats", type=int, default=3, help="timed generations per setting (median).")
  p.add_argument("--batch_approx_samples", type=int, default=0,
                 help="CALM T=1/2 pool size S (0: config.sampling.batch_approx_samples).")
  p.add_argument("--skip_generate", action="store_true", help="train-step measurements only.")
  p.add_argument("--cache_lens", type=int_list, default=list(decode_steps.CACHE_LENS),
                 help="KV-cache slots of the decode-step timings.")
  p.add_argument("--decode_steps", type=int, default=8, help="timed decode steps (median).")
  p.add_argument("--skip_decode", action="store_true", help="no decode-step timings.")
  p.add_argument("--count_flops_sizes", default="",
                 help="other sizes (e.g. M) whose XLA FLOPs/token of AR and CALM K=4 are counted.")
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="device peak (e.g. 990 for an H200 in bf16): adds MFU; 0 leaves it out.")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if not args.batch_size and args.size != "tiny":
    args.batch_size = 16      # the experiments' 256 x 2048 does not fit one device's memory
  if args.output is None:
    args.output = os.path.join(HERE, f"throughput_{args.size}.json")
  for k in args.ks:
    if args.gen_tokens % k:
      p.error(f"--gen_tokens={args.gen_tokens} must be a multiple of every K in --ks ({k}).")
  return args


def measure_train(bench, times, args):
  """Tokens/s, FLOPs per token (XLA's and analytic) and MFU of one model's timed train steps."""
  tokens = bench.config.train.batch_size * bench.config.data.seq_len
  step_s = bench_lib.median(times)
  ae_model = bench.parts["ae_config"].model if bench.parts.get("ae_config") else None
  out = {"tokens_per_step": tokens, "step_time_s": step_s, "step_times_s": times,
         "tokens_per_s": tokens / step_s, "flops_per_step": bench.flops_per_step,
         "flops_per_token": bench.flops_per_step / tokens if bench.flops_per_step else None,
         "flops_per_token_analytic": stages.train_flops_per_token(bench.config, ae_model),
         "compile_s": bench.compile_s}
  if args.peak_tflops and bench.flops_per_step:
    out["mfu"] = bench.flops_per_step / step_s / (args.peak_tflops * 1e12)
  elif out["flops_per_token"]:
    devices = jax.devices()
    value = peak.mfu(out["flops_per_token"], out["tokens_per_s"], devices[0].device_kind,
                     len(devices))
    if value is not None:
      out["mfu"] = value
  return out


def _generation_loop(name, bench, batch, temperature, method, args):
  """(call, info) of one model's compiled generation loop at one batch and temperature.

  The loop stops early once every row has emitted EOS, which random weights do at
  random moments; a rate over a 2-step loop measures the prefill, not decoding. So the
  first of up to MAX_SEED_TRIES seeds whose loop runs all its steps is timed (else the
  longest one; its steps are recorded either way). These runs are also the warm-up.
  """
  config, model = bench.config, bench.parts["model"]
  params = bench.inference_params()
  ids = np.random.default_rng(args.seed).integers(4, config.model.vocab_size, PROMPT_LEN)
  k = 1 if name == "ar" else config.model.patch_size
  draws = 1
  if name == "ar":
    prompt = np.tile(decode.ar_prompt(ids, SPECIAL.eos)[None], (batch, 1))
    jitted = decode.make_ar_generate(model, max_tokens=args.gen_tokens, temperature=temperature,
                                     top_k=0, ids=SPECIAL)
  else:
    prompt = np.tile(decode.calm_prompt(ids, k, SPECIAL.eos).reshape(1, -1, k), (batch, 1, 1))
    spec = decode.frozen_sampling(config.sampling, temperature=temperature,
                                  max_tokens=args.gen_tokens, num_samples=batch, method=method)
    if args.batch_approx_samples:
      spec = spec._replace(batch_approx_samples=args.batch_approx_samples)
    draws = 1 if temperature == 1.0 else spec.batch_approx_samples
    jitted = decode.make_calm_generate(model, num_chunks=args.gen_tokens // k, sampling=spec,
                                       ids=SPECIAL)
  compiled = jitted.lower(params, prompt, jax.random.key(args.seed)).compile()
  full_steps, best = args.gen_tokens // k, None
  for seed in range(args.seed, args.seed + MAX_SEED_TRIES):
    _, stats = jax.block_until_ready(compiled(params, prompt, jax.random.key(seed)))
    steps = int(jax.device_get(stats["num_chunks"] if "num_chunks" in stats
                               else stats["num_steps"]))
    if best is None or steps > best[0]:
      best = (steps, seed)
    if steps >= full_steps:
      break
  steps, seed = best
  rng = jax.random.key(seed)
  info = {"tokens": batch * steps * k, "loop_steps": steps, "full_steps": full_steps,
          "seed": seed, "temperature": temperature,
          "method": "softmax" if name == "ar" else method, "draws_per_chunk": draws}
  return (lambda: jax.block_until_ready(compiled(params, prompt, rng))), info


def measure_generation(benches, rules, mesh, batch, setting, args):
  """{name: {...tokens_per_s...}} of every model at one batch and setting, timed in turns."""
  label, temperature, method = setting
  calls, infos = [], {}
  for name, bench in benches.items():
    with sharding.activate(mesh, rules[name]):
      call, infos[name] = _generation_loop(name, bench, batch, temperature, method, args)
    calls.append(call)
  for (name, info), times in zip(infos.items(),
                                 bench_lib.time_in_turns(calls, 0, args.gen_repeats)):
    seconds = bench_lib.median(times)
    info.update(tokens_per_s=info["tokens"] / seconds, seconds=seconds, times_s=times)
    print(f"  generate {name} batch {batch} {label}: {info['tokens_per_s']:,.0f} tokens/s",
          flush=True)
  return infos


def ratios(models, k=RATIO_K):
  """CALM K=k over AR: train tokens/s, FLOPs per token, generation tokens/s (T=1 and T=1/2)."""
  calm, ar = models.get(f"calm_k{k}", {}), models.get("ar", {})
  over_ar = lambda *keys: bench_lib.ratio(bench_lib.dig(calm, *keys), bench_lib.dig(ar, *keys))
  out = {"train_tokens_per_s": over_ar("train", "tokens_per_s"),
         "flops_per_token": over_ar("train", "flops_per_token")}
  for batch_key in sorted(bench_lib.dig(ar, "generate") or {}):
    for label, suffix in (("T=1", ""), ("T=1/2", "_t_half")):
      out[f"generate_tokens_per_s_{batch_key}{suffix}"] = over_ar(
          "generate", batch_key, label, "tokens_per_s")
  return out


def tables(result):
  """The parameter, train and generation tables (Markdown) of a result dict."""
  models = result["models"]
  ar = models.get("ar", {})
  names = list(models)
  label = lambda n: "AR" if n == "ar" else f"CALM K={models[n]['K']}"
  params = bench_lib.format_table(
      ["model", "backbone", "head", "compression", "frozen AE", "trainable"],
      [[label(n)] + [bench_lib.fmt(models[n]["params"][g], ",") for g in
                     ("backbone", "head", "compression", "frozen_autoencoder", "trainable")]
       for n in names])
  has_mfu = any(bench_lib.dig(models[n], "train", "mfu") is not None for n in names)
  train_rows = []
  for n in names:
    t = models[n].get("train", {})
    x_ar = lambda key, t=t: bench_lib.ratio(t.get(key), bench_lib.dig(ar, "train", key))
    row = [label(n), bench_lib.fmt(t.get("tokens_per_s"), ",.0f"),
           bench_lib.fmt(x_ar("tokens_per_s"), ".2f"),
           bench_lib.fmt(t.get("flops_per_token"), ".3e"),
           bench_lib.fmt(x_ar("flops_per_token"), ".2f"),
           bench_lib.fmt(t.get("step_time_s"), ".4f")]
    if has_mfu:
      row.append(bench_lib.fmt(100 * t["mfu"] if "mfu" in t else None, ".1f"))
    train_rows.append(row)
  header = ["model", "train tokens/s", "x AR", "FLOPs/token", "x AR", "step s (median)"]
  out = [params, bench_lib.format_table(header + (["MFU %"] if has_mfu else []), train_rows)]
  gen_names = [n for n in names if "generate" in models[n]]
  if gen_names:
    columns = [(b, g) for b in models[gen_names[0]]["generate"] for g, _, _ in GEN_SETTINGS]
    header = ["model"] + [h for b, g in columns for h in (f"gen {b} {g} tok/s", "x AR")]
    rows = []
    for n in gen_names:
      row = [label(n)]
      for b, g in columns:
        value = bench_lib.dig(models[n], "generate", b, g, "tokens_per_s")
        versus = bench_lib.dig(ar, "generate", b, g, "tokens_per_s")
        row += [bench_lib.fmt(value, ",.0f"), bench_lib.fmt(bench_lib.ratio(value, versus), ".2f")]
      rows.append(row)
    out.append(bench_lib.format_table(header, rows))
  out += decode_tables(result)
  r = result["ratios"]
  out.append(f"CALM K={RATIO_K} / AR: " + ", ".join(
      f"{k} {bench_lib.fmt(v, '.2f')}" for k, v in r.items()))
  out.append(targets.format_rows(result.get("targets") or targets.target_rows(result)))
  return "\n\n".join(out)


def decode_tables(result):
  """Decode-step milliseconds per model and batch at every cache size (short and full fill)."""
  out = []
  for key, what in (("decode_step_s", f"{decode_steps.FILL} positions filled"),
                    ("decode_step_full_s", "cache nearly full")):
    steps = result.get(key) or {}
    rows = [[name, batch] + [bench_lib.fmt(1e3 * v, ".3f") for v in by_len.values()]
            for name, by_batch in steps.items() for batch, by_len in by_batch.items()]
    if rows:
      lens = list(next(iter(next(iter(steps.values())).values())))
      out.append(f"decode step ms ({what}):\n" + bench_lib.format_table(
          ["model", "batch"] + [f"{n} slots" for n in lens], rows))
  return out


def count_flops(args, sizes):
  """{size: {'ar': ..., 'calm_k4': ...}}: XLA's FLOPs per token of an unrolled step (batch 1)."""
  out = {}
  for size in sizes:
    counts = {}
    for name, (config, ae_config) in bench_lib.model_configs(size, [RATIO_K]).items():
      bench_lib.set_shape(config, args.dtype, 1, 0)
      mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
      rules = sharding.rules(config)
      with sharding.activate(mesh, rules):
        flops = bench_lib.train_step_flops(config, ae_config, mesh, rules)
        counts[name] = flops / config.data.seq_len
      print(f"  {size} {name}: {counts[name]:.4e} FLOPs/token (XLA, unrolled)", flush=True)
    out[size] = counts
  return out


def _build(configs, mesh, args):
  """({name: TrainBench}, {name: axis rules}, {name: result entry}): every model compiled."""
  benches, rules, entries = {}, {}, {}
  for name, (config, ae_config) in configs.items():
    bench_lib.set_shape(config, args.dtype, args.batch_size, args.seq_len)
    if ae_config is not None:
      ae_config.train.compute_dtype = args.dtype
    rules[name] = sharding.rules(config)
    print(f"== {name}: compiling the train step", flush=True)
    with sharding.activate(mesh, rules[name]):
      benches[name] = bench = bench_lib.TrainBench(config, ae_config, mesh, rules[name],
                                                   seed=args.seed)
    entries[name] = {"K": config.model.patch_size, "stage": config.stage,
                     "params": bench.params, "batch_size": config.train.batch_size,
                     "seq_len": config.data.seq_len}
  return benches, rules, entries


def _save(result, args):
  result["ratios"] = ratios(result["models"])
  bench_lib.write_json(args.output, result)


def run(args):
  """Runs every measurement; returns the result dict (also written to args.output).

  Every model is compiled first and stays in memory, so the train steps (and each
  generation setting) of all models are timed in turns: side by side in time."""
  configs = bench_lib.model_configs(args.size, args.ks)
  result = {"benchmark": "throughput", "size": args.size, "dtype": args.dtype,
            "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
            "machine": bench_lib.machine_info(), "settings": {
                k: v for k, v in vars(args).items() if k != "output"},
            "models": {}, "ratios": {}}
  mesh = sharding.make_mesh(configs["ar"][0].mesh)
  benches, rules, result["models"] = _build(configs, mesh, args)
  print("== train steps, in turns", flush=True)
  times = bench_lib.time_in_turns([b.step for b in benches.values()], args.warmup, args.steps)
  for (name, bench), seconds in zip(benches.items(), times):
    train = result["models"][name]["train"] = measure_train(bench, seconds, args)
    print(f"  train {name}: {train['tokens_per_s']:,.0f} tokens/s, "
          f"{train['flops_per_token'] or 0:.3e} FLOPs/token (compile {bench.compile_s:.1f}s)",
          flush=True)
  _save(result, args)
  gen = {n: b for n, b in benches.items() if n == "ar" or b.config.model.patch_size in args.gen_ks}
  for batch in ([] if args.skip_generate else args.gen_batches):
    for setting in GEN_SETTINGS:
      for name, row in measure_generation(gen, rules, mesh, batch, setting, args).items():
        result["models"][name].setdefault("generate", {}).setdefault(f"b{batch}", {})[
            setting[0]] = row
      _save(result, args)
  for name in ([] if args.skip_decode else ("ar", f"calm_k{RATIO_K}")):
    if name in benches:
      bench = benches[name]
      with sharding.activate(mesh, rules[name]):
        decode = decode_steps.measure(bench.parts["model"], bench.inference_params(),
                                      0 if name == "ar" else RATIO_K, args.gen_batches,
                                      args.cache_lens, args.decode_steps)
      for key in ("decode_step_s", "decode_step_full_s"):
        result.setdefault(key, {})[name] = decode[key]
      _save(result, args)
  del benches
  sizes = [s for s in args.count_flops_sizes.split(",") if s and s != args.size]
  if sizes:
    result["flops_per_token_compiled"] = count_flops(args, sizes)
  result["ratios"] = ratios(result["models"])
  result["targets"] = targets.target_rows(result)
  return bench_lib.finish(result, args.output, tables(result))


def main(argv=None):
  run(parse_args(argv))


if __name__ == "__main__":
  main()
