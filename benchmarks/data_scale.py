r"""Data at corpus scale: prepare a generated .jsonl.zst with flat memory, then train on it and resume.

  nice -n 10 python benchmarks/data_scale.py [--gb 2] [--workers 2] [--dir /tmp/calm_data_scale] \
      [--output benchmarks/data_scale_2gb.json] [--train_steps 6] [--prepare_timeout S]

1. Generates DIR/corpus_GBgb.jsonl.zst: --gb GB of JSONL (uncompressed; documents of 50-3000
   words of the built-in corpus's vocabulary, drawn from a 64 MB pool, each numbered), written
   through a streaming zstd compressor (never in the repository: DIR defaults to /tmp).
2. Trains a 512-piece tokenizer on the built-in corpus.
3. Runs `calm-prepare --num_workers W` on it as a subprocess and samples the resident memory
   (VmRSS) of its whole process tree every 0.2 s: the baseline is the tree's peak RSS in
   the first 10% of the run (interpreters, tokenizer and buffers loaded), the growth is the
   peak over the other 90% minus the baseline. Flat memory = the growth does not scale with
   the input. Throughput: tokens / wall seconds / workers (tokens/s per core), and tokens
   per CPU-second of the process tree (what a core of its own gives on a loaded machine).
   --prepare_timeout S stops it after S seconds and reports the shards done so far (for a
   machine too loaded to finish).
4. Streams the .jsonl.zst straight into the training pipeline: takes the state after
   --stream_batches batches, restores it in a new pipeline and checks the next batches are
   identical (and times the restore, which decompresses up to the saved offset).
5. Trains the tiny AR baseline on arrayrecord:DIR for --train_steps steps, kills nothing but
   resumes: a run of N/2 steps then N (resumed) against one run of N steps; the losses of
   every step must be bit-identical.
Writes the JSON (rewritten after every phase) and prints a summary.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

if __package__ in (None, ""):         # `python benchmarks/data_scale.py`: the repo root on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from benchmarks import bench_lib  # pylint: disable=g-import-not-at-top
from calm_jax.data import builtin  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 512


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gb", type=float, default=2.0, help="uncompressed GB of JSONL")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--dir", default="/tmp/calm_data_scale")
  parser.add_argument("--output", default="")
  parser.add_argument("--stream_batches", type=int, default=200)
  parser.add_argument("--train_steps", type=int, default=6, help="0: skip the training check")
  parser.add_argument("--prepare_timeout", type=float, default=0,
                      help="stop calm-prepare after this many seconds and report the shards done")
  args = parser.parse_args(argv)
  args.output = args.output or os.path.join(ROOT, "benchmarks", f"data_scale_{args.gb:g}gb.json")
  return args


def generate(path, gb, seed=0, pool_mb=64):
  """Writes `gb` GB of JSONL through a streaming zstd compressor; returns counts.

  Documents are drawn from a pool of `pool_mb` MB of generated ones (random words of the
  built-in corpus, 50-3000 words), each line with its own number, so that generating a large
  file costs little CPU; tokenizing them costs what new text costs.
  """
  import zstandard  # pylint: disable=g-import-not-at-top
  words = sorted({w for _, t in builtin.documents("all") for w in t.split() if w.isalpha()})
  words = np.asarray(words)
  rng = np.random.default_rng(seed)
  pool, size = [], 0
  while size < pool_mb * 1e6:
    n = int(rng.integers(50, 3000))
    pool.append(" ".join(words[rng.integers(0, len(words), size=n)]))
    size += len(pool[-1])
  target, written, docs = int(gb * 1e9), 0, 0
  with open(path, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as f:
    while written < target:
      chunk = "".join(json.dumps({"text": f"{docs + i} {pool[j]}"}) + "\n"
                      for i, j in enumerate(rng.integers(0, len(pool), size=256))).encode()
      f.write(chunk)
      written += len(chunk)
      docs += 256
  return dict(uncompressed_bytes=written, compressed_bytes=os.path.getsize(path), documents=docs,
              pool_mb=pool_mb)


def _tree(pid):
  """(resident bytes, CPU seconds) of pid and all its live descendants (from /proc)."""
  children = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
      except (OSError, IndexError, ValueError):
        pass
  rss, cpu, todo = 0, 0.0, [pid]
  while todo:
    p = todo.pop()
    todo += children.get(p, [])
    try:
      with open(f"/proc/{p}/status") as f:
        rss += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) * 1024
      with open(f"/proc/{p}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, IndexError, ValueError):
      pass
  return rss, cpu


def _done_counts(out_dir):
  shards = tokens = 0
  for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
    if name.endswith(".done"):
      with open(os.path.join(out_dir, name)) as f:
        tokens += json.load(f)["tokens"]
      shards += 1
  return shards, tokens


def prepare_with_memory(spec, tokenizer, out_dir, workers, timeout=0):
  """Runs calm-prepare as a subprocess, sampling its tree's RSS and CPU time.

  timeout > 0: stop it after that many seconds and report the shards done so far.
  """
  import signal  # pylint: disable=g-import-not-at-top
  cmd = [sys.executable, "-m", "calm_jax.cli.prepare", "--data", spec, "--tokenizer", tokenizer,
         "--output", out_dir, "--num_workers", str(workers)]
  start = time.time()
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
  samples = []  # (seconds, rss bytes, shards done, tree CPU seconds)

  def sample():
    while proc.poll() is None:
      rss, cpu = _tree(proc.pid)
      done = len([n for n in os.listdir(out_dir) if n.endswith(".done")]) if os.path.isdir(
          out_dir) else 0
      samples.append((time.time() - start, rss, done, cpu))
      if timeout and time.time() - start > timeout:
        os.killpg(proc.pid, signal.SIGTERM)
        return
      time.sleep(0.2)

  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  output = proc.communicate()[0]
  thread.join()
  seconds = time.time() - start
  finished = proc.returncode == 0
  if not finished and not timeout:
    raise RuntimeError(f"calm-prepare failed:\n{output}")
  shards, tokens = _done_counts(out_dir)
  cpu_seconds = max(s[3] for s in samples)  # live processes only: the workers live to the end
  early = [s[1] for s in samples if s[0] <= 0.1 * seconds] or [samples[0][1]]
  late = [s[1] for s in samples if s[0] > 0.1 * seconds] or early
  baseline, peak = max(early), max(late)
  return dict(command=" ".join(cmd), finished=finished, seconds=round(seconds, 1),
              workers=workers, shards_done=shards, tokens=tokens,
              tokens_per_s_per_core=round(tokens / seconds / workers),
              cpu_seconds=round(cpu_seconds, 1),
              tokens_per_cpu_second=round(tokens / max(cpu_seconds, 1e-9)),
              rss_baseline_mb=round(baseline / 2**20, 1), rss_peak_mb=round(peak / 2**20, 1),
              rss_growth_mb=round((peak - baseline) / 2**20, 1),
              rss_samples_mb=[[round(t, 1), round(r / 2**20, 1), d] for t, r, d, _ in
                              samples[::25]],
              output_tail=output.strip().splitlines()[-2:])


def _find(state, key):
  """The value of `key` anywhere in a nested grain state."""
  if isinstance(state, dict):
    if key in state:
      return state[key]
    for value in state.values():
      found = _find(value, key)
      if found is not None:
        return found
  return None


def stream_resume(spec, tokenizer_path, batches):
  """Streams the compressed file into the training pipeline; restores a mid-file state exactly."""
  from calm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from calm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.load(tokenizer_path)
  kw = dict(seq_len=256, batch_size=8, shuffle=True, seed=0, repeat=True)
  it = iter(pipeline.make_dataset(spec, tok, **kw))
  start = time.time()
  for _ in range(batches):
    next(it)
  read_s = time.time() - start
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it)["tokens"] for _ in range(5)]
  start = time.time()
  restored = iter(pipeline.make_dataset(spec, tok, **kw))
  restored.set_state(state)
  got = [next(restored)["tokens"] for _ in range(5)]
  restore_s = time.time() - start
  position = _find(state, "position")
  return dict(batches_before=batches, identical=all(np.array_equal(a, b) for a, b in
                                                     zip(got, expected)),
              resumed_at_offset_bytes=position, read_tokens_per_s=round(
                  batches * 8 * 256 / read_s), restore_seconds=round(restore_s, 2))


def _train(workdir, tokenizer, data, steps, every):
  overrides = {"data.tokenizer": tokenizer, "data.vocab_size": VOCAB, "model.vocab_size": VOCAB,
               "data.train": data, "data.seq_len": 64, "train.batch_size": 8,
               "train.steps": steps, "train.log_every": 1, "train.eval_every": 0,
               "checkpoint.every_steps": every, "checkpoint.async_save": False}
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
  subprocess.run([sys.executable, "-m", "calm_jax.cli.train", "--config",
                  "experiments/ar_baseline.py:size=tiny", "--workdir", workdir,
                  *[f"--config.{k}={v}" for k, v in overrides.items()]],
                 cwd=ROOT, env=env, check=True, capture_output=True)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def train_and_resume(tokenizer, data, base, steps):
  """One run of `steps` against steps/2 + a resume to `steps`: losses of every step equal?"""
  import shutil  # pylint: disable=g-import-not-at-top
  for name in ("straight", "resumed"):
    shutil.rmtree(os.path.join(base, name), ignore_errors=True)
  start = time.time()
  straight = _train(os.path.join(base, "straight"), tokenizer, data, steps, steps)
  _train(os.path.join(base, "resumed"), tokenizer, data, steps // 2, steps // 2)
  resumed = _train(os.path.join(base, "resumed"), tokenizer, data, steps, steps)
  return dict(data=data, steps=steps, losses_straight=straight, losses_resumed=resumed,
              bit_identical=straight == resumed, seconds=round(time.time() - start, 1))


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.dir, exist_ok=True)
  result = dict(machine=bench_lib.machine_info(), args=vars(args))
  corpus = os.path.join(args.dir, f"corpus_{args.gb:g}gb.jsonl.zst")
  if not os.path.exists(corpus + ".json"):
    start = time.time()
    made = dict(generate(corpus + ".tmp", args.gb), seconds=round(time.time() - start, 1))
    os.replace(corpus + ".tmp", corpus)
    bench_lib.write_json(corpus + ".json", made)
  with open(corpus + ".json") as f:
    result["corpus"] = json.load(f)
  result["corpus_path"] = corpus
  tokenizer = os.path.join(args.dir, "tokenizer.model")
  if not os.path.exists(tokenizer):
    from calm_jax.data import sources  # pylint: disable=g-import-not-at-top
    from calm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    tokenizer_lib.train_tokenizer(sources.iter_texts("builtin:python_docs"), VOCAB, tokenizer,
                                  max_chars=1_000_000)
  out_dir = os.path.join(args.dir, f"prepared_{args.gb:g}gb")
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(out_dir, ignore_errors=True)
  result["prepare"] = prepare_with_memory(f"jsonl:{corpus}", tokenizer, out_dir, args.workers,
                                          args.prepare_timeout)
  bench_lib.write_json(args.output, result)
  if not result["prepare"]["finished"]:
    print(f"prepare stopped after {args.prepare_timeout} s: {result['prepare']}")
    return
  result["stream_resume"] = stream_resume(f"jsonl:{corpus}", tokenizer, args.stream_batches)
  bench_lib.write_json(args.output, result)
  if args.train_steps:
    result["train_resume"] = train_and_resume(tokenizer, f"arrayrecord:{out_dir}",
                                              os.path.join(args.dir, "train"), args.train_steps)
    bench_lib.write_json(args.output, result)
  p = result["prepare"]
  print(f"prepare: {p['shards_done']} shards, {p['tokens']} tokens in {p['seconds']} s with "
        f"{p['workers']} workers: {p['tokens_per_s_per_core']} tokens/s per core "
        f"({p['tokens_per_cpu_second']} per CPU-second); RSS baseline "
        f"{p['rss_baseline_mb']} MB, peak {p['rss_peak_mb']} MB, growth {p['rss_growth_mb']} MB")
  print(f"stream resume: {result['stream_resume']}")
  if args.train_steps:
    t = result["train_resume"]
    print(f"train on arrayrecord + resume: bit-identical={t['bit_identical']} ({t['seconds']} s)")
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
