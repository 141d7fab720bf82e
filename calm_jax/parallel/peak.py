"""Peak dense bfloat16 FLOP/s per chip of the accelerators we train on, and the model FLOPs utilisation (MFU) against it.

MFU = model FLOPs per token (models/flops.py) x tokens per second / (peak per chip x chips).
Peaks are the vendors' dense (no sparsity) bf16 numbers; a CPU, or a chip not in the
table, has none and gets no MFU.
"""

# (substring of jax's device_kind, lower case; peak FLOP/s per chip), most specific first.
PEAK_BF16_FLOPS = (
    ("h200", 989e12),          # NVIDIA H200 SXM: the H100's Hopper compute, more HBM
    ("h100", 989e12),          # NVIDIA H100 SXM (the PCIe part is 756e12)
    ("v5p", 459e12),           # TPU v5p ('TPU v5p' or 'TPU v5')
    ("v6 lite", 918e12),       # TPU v6e (Trillium) reports 'TPU v6 lite'
    ("v6e", 918e12),
)


def peak_flops(device_kind):
  """Peak bf16 FLOP/s of one chip of this kind, or None (CPU, unknown chips)."""
  kind = str(device_kind).lower()
  if kind == "tpu v5":          # v5p's device_kind on some runtimes
    return 459e12
  return next((peak for name, peak in PEAK_BF16_FLOPS if name in kind), None)


def utilisation_metrics(flops_per_token, tokens_per_s, devices):
  """{'flops_per_token', 'mfu' (with a known peak)} for a training log row."""
  out = {"flops_per_token": flops_per_token}
  value = mfu(flops_per_token, tokens_per_s, devices[0].device_kind, len(devices))
  if value is not None:
    out["mfu"] = value
  return out


def mfu(flops_per_token, tokens_per_s, device_kind, num_devices):
  """Model FLOPs utilisation in [0, 1], or None without a known peak."""
  peak = peak_flops(device_kind)
  if peak is None or not flops_per_token:
    return None
  return flops_per_token * tokens_per_s / (peak * num_devices)
