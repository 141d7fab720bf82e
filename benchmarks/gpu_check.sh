#!/usr/bin/env bash
# benchmarks/gpu_check.sh: the throughput benchmark at size M in bf16 on one GPU (a lent H200), with MFU.
#
#   bash benchmarks/gpu_check.sh            # from the repo root; about 6 minutes, hard cap 7.5
#
# Writes throughput_M.json (CALM K=4 and the AR baseline: train step and generation) and
# throughput_M_more_k.json (CALM K=1,2,8: train step only, if time is left) into $OUT when
# set (the device tool's output folder), else benchmarks/, and prints the MFU of every train
# step: MFU = FLOPs per step (XLA cost analysis) / median step time / peak, against the
# H200's dense bf16 peak of ~990 TFLOP/s (PEAK_TFLOPS overrides it).
#
# Installs nothing from a network. The H200 image has jax (CUDA), flax, optax, orbax,
# sentencepiece, absl, tqdm and numpy, but not ml_collections, grain, array_record,
# portpicker or tensorboardX. Carry those as wheels (see /work/.library/device/README.md),
# on a machine with pip access, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0 grain==0.2.18 \
#     array_record==0.8.6 portpicker tensorboardX==2.6.5
# and call the device tool with carry=[".whl"] and command "bash benchmarks/gpu_check.sh".
# Wheels found in .whl/ are unpacked into /tmp/site (no index, no dependencies). The
# package itself is `pip install -e .`'d only when pyproject.toml or setup.py exists and every
# dependency is already importable; otherwise the repo root goes on PYTHONPATH.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks}
PEAK=${PEAK_TFLOPS:-990}
START=$(date +%s)
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "gpu_check: installing the carried wheels failed"; exit 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

MISSING=$("$PY" - <<'EOF'
import importlib
names = ["jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "grain", "array_record",
         "sentencepiece", "absl", "tqdm", "tensorboardX", "numpy"]
missing = []
for name in names:
  try:
    importlib.import_module(name)
  except Exception:  # pylint: disable=broad-except
    missing.append(name)
print(" ".join(missing))
EOF
)
if [ -n "$MISSING" ]; then
  echo "gpu_check: missing Python packages: $MISSING"
  echo "gpu_check: carry them as wheels in .whl/ (see the header of benchmarks/gpu_check.sh); nothing was run."
  exit 3
fi

if [ -f pyproject.toml ] || [ -f setup.py ]; then
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    || echo "gpu_check: 'pip install -e .' failed; using PYTHONPATH instead"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

"$PY" -c "import jax; b = jax.default_backend(); print('backend', b, jax.devices()); assert b == 'gpu', b" \
  || { echo "gpu_check: JAX sees no GPU; nothing was run."; exit 4; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true

# 1. CALM K=4 against the AR baseline: train step and generation (batch 1 and 32).
timeout 330 "$PY" benchmarks/throughput.py --size M --dtype bfloat16 --ks 4 --steps 10 \
  --peak_tflops "$PEAK" --output "$DEST/throughput_M.json"
RC=$?
[ $RC -ne 0 ] && echo "gpu_check: throughput (K=4) exited with $RC; the JSON keeps what was measured"

# 2. The other chunk sizes, train step only, in the time that is left (hard cap 450 s in all).
LEFT=$((450 - $(date +%s) + START))
if [ $LEFT -gt 60 ]; then
  timeout "$LEFT" "$PY" benchmarks/throughput.py --size M --dtype bfloat16 --ks 1,2,8 \
    --skip_generate --steps 10 --peak_tflops "$PEAK" --output "$DEST/throughput_M_more_k.json"
else
  echo "gpu_check: ${LEFT}s left; skipped K=1,2,8"
fi

"$PY" - "$DEST/throughput_M.json" "$DEST/throughput_M_more_k.json" <<'EOF'
import json, os, sys
print("\nMFU of the train step (bf16, peak %s TFLOP/s):" % os.environ.get("PEAK_TFLOPS", "990"))
for path in sys.argv[1:]:
  if not os.path.exists(path):
    continue
  result = json.load(open(path))
  for name, model in result["models"].items():
    t = model.get("train", {})
    if "mfu" in t:
      print(f"  {name:10s} MFU {100 * t['mfu']:5.1f}%  {t['tokens_per_s']:12,.0f} tokens/s  "
            f"{t['flops_per_token']:.3e} FLOPs/token  step {t['step_time_s']:.4f}s")
  if result.get("ratios"):
    print("  ratios CALM K=4 / AR:", {k: round(v, 3) for k, v in result["ratios"].items() if v})
EOF
echo "gpu_check: done in $(( $(date +%s) - START ))s"
