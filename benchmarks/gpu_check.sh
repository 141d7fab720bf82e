#!/usr/bin/env bash
# benchmarks/gpu_check.sh: install with the accelerator's own jax, print versions, then one JSON of
# bf16 train steps (autoencoder base, AR S and M, CALM M: tokens/s and MFU) and decode steps at
# 256 and 4,096 slots (AR-M, CALM-M), all compiled with scanned layers. Under 8 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh             # from anywhere; on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # any CPU: no install, tiny sizes, float32, ~1 minute
#
# Output: $OUT/gpu_check.json when OUT is set (the device tool's folder), else benchmarks/;
# the log prints the versions, every measurement and a summary. PEAK_TFLOPS overrides the
# peak table (calm_jax/parallel/peak.py: H200 and H100 989 dense bf16 TFLOP/s per chip).
#
# Install. The jax, jaxlib and CUDA plugin already on the machine are pinned (a constraints
# file from pip freeze), so pip never replaces the accelerator's jax (setup.py accepts jax
# 0.10.x on Python 3.11 and 0.11.x, e.g. with the CUDA 13 plugin, on Python 3.12). The rest
# comes from the package index, or, on a machine with no network, from wheels carried in
# .whl/ (pip install --no-index --find-links .whl). Make them here, with pip access:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download -d .whl --python-version 3.12 --only-binary=:all: \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --no-deps \
#     ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 portpicker tensorboardX==2.6.5 \
#     'flax>=0.12.8,<0.13' 'optax>=0.2.8,<0.3' 'orbax-checkpoint>=0.12.8,<0.13' \
#     sentencepiece tokenizers etils treescope tensorstore simplejson humanize
# and call the device tool with carry=[".whl"]. If pip still cannot resolve everything
# (say tensorflow-datasets, which only tfds: data specs import), the carried wheels are
# unpacked without dependencies into /tmp/site and the repo goes on PYTHONPATH.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks}
START=$(date +%s)
LIMIT=${GPU_CHECK_LIMIT_S:-420}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
export PYTHONUNBUFFERED=1
mkdir -p "$DEST"

echo "== gpu_check: $(date -u +%FT%TZ) on $(hostname); dry run: $DRY"
"$PY" --version
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null \
  || echo "(no nvidia-smi)"
JAX_BEFORE=$("$PY" -c "import jax; print(jax.__version__)" 2>/dev/null || echo none)
echo "jax already installed: $JAX_BEFORE"

deps_ok() {
  "$PY" - <<'EOF'
import importlib, sys
names = ["jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "grain", "array_record",
         "sentencepiece", "absl", "tqdm", "tensorboardX", "numpy", "tokenizers"]
missing = []
for name in names:
  try:
    importlib.import_module(name)
  except Exception:  # pylint: disable=broad-except
    missing.append(name)
print("missing:", " ".join(missing) or "none")
sys.exit(1 if missing else 0)
EOF
}

# 1. Install (never on a dry run: it must not touch the environment it checks).
if [ $DRY -eq 0 ]; then
  CONS=$(mktemp)
  "$PY" -m pip freeze 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda[0-9]*-(plugin|pjrt)|nvidia-[a-z0-9-]+)==' > "$CONS"
  echo "pinned: $(tr '\n' ' ' < "$CONS")"
  WHEELS=()
  ls .whl/*.whl >/dev/null 2>&1 && WHEELS=(--no-index --find-links .whl)
  if ! "$PY" -m pip install -q --retries 1 --timeout 10 --no-build-isolation -c "$CONS" \
      ${WHEELS[@]+"${WHEELS[@]}"} -e . ; then
    echo "gpu_check: pip could not resolve every dependency; carried wheels without deps"
    if ls .whl/*.whl >/dev/null 2>&1; then
      "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
deps_ok || { echo "gpu_check: missing Python packages (see above); carry them in .whl/ (header)."; exit 3; }
JAX_AFTER=$("$PY" -c "import jax; print(jax.__version__)")
if [ "$JAX_BEFORE" != none ] && [ "$JAX_BEFORE" != "$JAX_AFTER" ]; then
  echo "gpu_check: jax changed from $JAX_BEFORE to $JAX_AFTER during the install; stopping."
  exit 5
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# 2. Versions and devices.
"$PY" - <<'EOF' || { echo "gpu_check: jax does not start"; exit 4; }
import importlib.metadata as md, jax
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
             "orbax-checkpoint", "grain", "numpy"):
  try:
    print(f"  {name} {md.version(name)}")
  except md.PackageNotFoundError:
    pass
print("  backend", jax.default_backend(), jax.devices())
EOF
if [ $DRY -eq 0 ]; then
  "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" \
    || { echo "gpu_check: JAX sees no GPU; nothing was run (use --dry-run on a CPU)."; exit 4; }
fi

# 3. The measurements (the JSON keeps what finished if the time limit cuts them short).
LEFT=$((LIMIT - $(date +%s) + START))
[ $LEFT -lt 60 ] && { echo "gpu_check: only ${LEFT}s left after the install; nothing measured."; exit 6; }
ARGS=(--output "$DEST/gpu_check.json")
[ $DRY -eq 1 ] && ARGS+=(--dry_run)
[ -n "${PEAK_TFLOPS:-}" ] && ARGS+=(--peak_tflops "$PEAK_TFLOPS")
timeout "$LEFT" "$PY" benchmarks/gpu_bench.py "${ARGS[@]}"
RC=$?
[ $RC -ne 0 ] && echo "gpu_check: gpu_bench.py exited with $RC; the JSON keeps what was measured"

# 4. Summary.
"$PY" - "$DEST/gpu_check.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"\n{'model':<18}{'tokens/s':>14}{'step s':>10}{'FLOPs/token':>13}{'MFU':>8}")
for name, t in r.get("train", {}).items():
  mfu = "-" if t.get("mfu") is None else f"{100 * t['mfu']:.1f}%"
  print(f"{name:<18}{t['tokens_per_s']:>14,.0f}{t['step_time_s']:>10.4f}{t['flops_per_token']:>13.3e}{mfu:>8}")
for key in ("decode_step_s", "decode_step_full_s"):
  for name, by_batch in r.get(key, {}).items():
    for batch, by_len in by_batch.items():
      cells = "  ".join(f"{n} slots {1e3 * s:.3f} ms" for n, s in by_len.items())
      print(f"{key} {name} {batch}: {cells}")
print("attention kernels:", r.get("attention_kernels"))
EOF
echo "gpu_check: done in $(( $(date +%s) - START ))s; JSON: $DEST/gpu_check.json"
