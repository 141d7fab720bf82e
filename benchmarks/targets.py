"""The issue-15 performance targets as pass/fail rows of a throughput result (benchmarks/throughput.py).

Each row: what is compared, the measured value, the bound, and 'pass', 'fail' or
'not measured' (a size, batch or device this run did not cover). Ratios come from one run
of throughput.py, side by side; nothing here is timed.
"""
from benchmarks import bench_lib


def _row(target, measured, bound, at_most=True, note=""):
  if measured is None:
    status = "not measured"
  else:
    status = "pass" if (measured <= bound if at_most else measured >= bound) else "fail"
  return {"target": target, "measured": measured, "bound": bound,
          "op": "<=" if at_most else ">=", "status": status, "note": note}


def _decode_rows(result):
  rows = []
  for name, label in (("ar", "AR"), ("calm_k4", "CALM K=4")):
    for batch in ("b1", "b32"):
      steps = bench_lib.dig(result, "decode_step_s", name, batch) or {}
      rows.append(_row(f"{label} decode step 4096 / 256 slots, {batch}",
                       bench_lib.ratio(steps.get("4096"), steps.get("256")), 1.5))
  return rows


def _flops_rows(result):
  rows = []
  sizes = dict(bench_lib.dig(result, "flops_per_token_compiled") or {})
  models = result.get("models", {})
  if bench_lib.dig(models, "ar", "train", "flops_per_token"):
    sizes.setdefault(result.get("size"), {name: bench_lib.dig(models, name, "train", "flops_per_token")
                                      for name in ("ar", "calm_k4")})
  for size, bound in (("tiny", 0.56), ("M", 0.37)):
    counts = sizes.get(size, {})
    rows.append(_row(f"FLOPs/token CALM K=4 / AR at {size} (XLA's count, unrolled)",
                     bench_lib.ratio(counts.get("calm_k4"), counts.get("ar")), bound))
  return rows


def target_rows(result):
  """The targets of issue 15 against a throughput result dict."""
  models = result.get("models", {})
  rows = _decode_rows(result)
  for batch in ("b1", "b32"):
    rows.append(_row(f"CALM K=4 generation tokens/s / AR, {batch}, T=1",
                     bench_lib.dig(result, "ratios", f"generate_tokens_per_s_{batch}"), 3.0,
                     at_most=False))
  rows += _flops_rows(result)
  on_cpu = bench_lib.dig(result, "machine", "backend") == "cpu"
  rows.append(_row("CALM K=4 train tokens/s / AR at tiny on CPU",
                   bench_lib.dig(result, "ratios", "train_tokens_per_s")
                   if on_cpu and result.get("size") == "tiny" else None, 1.3, at_most=False))
  for name, label in (("calm_k4", "CALM-M"), ("ar", "AR-M")):
    mfu = bench_lib.dig(models, name, "train", "mfu") if result.get("size") == "M" else None
    rows.append(_row(f"{label} MFU on the H200 (bf16)", mfu, 0.40, at_most=False,
                     note="" if mfu is not None else "needs the GPU: gpu_check.sh"))
  return rows


def format_rows(rows):
  """A Markdown table of target rows."""
  lines = ["| target | measured | bound | status |", "|---|---|---|---|"]
  for r in rows:
    measured = "-" if r["measured"] is None else f"{r['measured']:.3g}"
    status = r["status"] + (f" ({r['note']})" if r["note"] else "")
    lines.append(f"| {r['target']} | {measured} | {r['op']} {r['bound']} | {status} |")
  return "\n".join(lines)
