r"""calm-plot: training curves of one or more runs in one PNG, against steps, tokens or FLOPs.

  calm-plot WORKDIR [WORKDIR...] [--output curves.png] [--x step|tokens|flops]

Panels: training loss (and the periodic eval's), BrierLM, Brier-1..4, autoencoder token
accuracy (training, periodic eval and calm-eval), learning rate and tokens/s. A run's rows come
from WORKDIR/metrics.jsonl (the last value per step: a resumed run logs steps again) and
calm-eval's results in WORKDIR (eval_step_<N>.json, eval_steps.jsonl). x-axes: --x tokens is
step x train.batch_size x data.seq_len (config.json); --x flops is tokens x the
flops_per_token the trainer logs, so a CALM run and an AR run overlay at equal compute.
"""
import glob
import json
import os

from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from calm_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from calm_jax import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from calm_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position

X_AXES = ("step", "tokens", "flops")
# (panel title, [(series name, key, from calm-eval's result files)]).
PANELS = (
    ("loss", [("train", "loss", False), ("eval", "eval/loss", False)]),
    ("BrierLM (calm-eval)", [("BrierLM", "brierlm", True)]),
    ("Brier-n (calm-eval)", [(f"Brier-{n}", f"brier{n}", True) for n in range(1, 5)]),
    ("autoencoder token accuracy", [("train", "token_accuracy_train", False),
                                    ("eval", "eval/token_accuracy", False),
                                    ("calm-eval", "token_accuracy", True)]),
    ("learning rate", [("lr", "lr", False)]),
    ("tokens/s", [("tokens/s", "tokens_per_s", False)]),
)
_STYLES = ("-", "--", ":", "-.")


class Run:
  """One workdir's curves: {key: {step: value}} from training rows and from calm-eval results."""

  def __init__(self, workdir):
    self.workdir = workdir
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
      raise errors.UserError(f"{path} not found: {workdir!r} is not a calm-train workdir "
                             "(or it has not logged a step yet).")
    config = config_lib.load_config(workdir)
    self.stage = config.stage
    self.tokens_per_step = config.train.batch_size * config.data.seq_len
    self.train = _curves(_read_rows(path))
    eval_rows = []
    for name in sorted(glob.glob(os.path.join(workdir, "eval_step_*.json"))):
      eval_rows += _read_rows(name, whole=True)
    if os.path.exists(os.path.join(workdir, "eval_steps.jsonl")):
      eval_rows += _read_rows(os.path.join(workdir, "eval_steps.jsonl"))
    self.evals = _curves(eval_rows)

  def flops_per_token(self):
    values = self.train.get("flops_per_token")
    return values[max(values)] if values else None

  def x_scale(self, x_axis):
    """Multiplier from steps to the x-axis unit."""
    if x_axis == "step":
      return 1.0
    if x_axis == "tokens":
      return float(self.tokens_per_step)
    flops = self.flops_per_token()
    if flops is None:
      raise errors.UserError(
          f"{self.workdir}/metrics.jsonl has no flops_per_token (the trainer logs it with every "
          "row; this run predates it): plot it with --x tokens or --x step.")
    return self.tokens_per_step * flops


def _read_rows(path, whole=False):
  with open(path) as f:
    try:
      return [json.load(f)] if whole else [json.loads(line) for line in f if line.strip()]
    except json.JSONDecodeError as e:
      raise errors.UserError(f"{path} is not valid JSON ({e}).") from e


def _curves(rows):
  """{key: {step: value}} for every numeric key, the last row of a step winning."""
  curves = {}
  for row in rows:
    for key, value in row.items():
      if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
        curves.setdefault(key, {})[int(row["step"])] = float(value)
  return curves


def _labels(workdirs):
  """Short distinct labels: the last path parts that tell the workdirs apart."""
  parts = [os.path.normpath(os.path.abspath(w)).split(os.sep) for w in workdirs]
  for depth in range(1, max(len(p) for p in parts) + 1):
    labels = ["/".join(p[-depth:]) for p in parts]
    if len(set(labels)) == len(labels):
      return labels
  return list(workdirs)


def plot(workdirs, output, x_axis="step"):
  """Draws every run of `workdirs` into `output` (PNG); returns the output path."""
  if x_axis not in X_AXES:
    raise errors.UserError(f"--x={x_axis!r}: use one of {', '.join(X_AXES)}.")
  runs = [Run(w) for w in workdirs]
  scales = [r.x_scale(x_axis) for r in runs]
  fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), constrained_layout=True)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, (title, series) in zip(axes.flat, PANELS):
    drawn = False
    for i, (run, label, scale) in enumerate(zip(runs, _labels(workdirs), scales)):
      for style, (name, key, from_evals) in zip(_STYLES, series):
        values = (run.evals if from_evals else run.train).get(key)
        if not values:
          continue
        steps = sorted(values)
        run_name = f"{label} ({run.stage})".replace(f"{run.stage} ({run.stage})", run.stage)
        name = run_name + (f" {name}" if len(series) > 1 else "")
        ax.plot([s * scale for s in steps], [values[s] for s in steps], style,
                color=colors[i % len(colors)], marker="o" if len(steps) < 8 else None,
                markersize=4, label=name)
        drawn = True
    ax.set_title(title)
    ax.set_xlabel({"step": "step", "tokens": "training tokens",
                   "flops": "training FLOPs"}[x_axis])
    ax.grid(alpha=0.3)
    if drawn:
      ax.legend(fontsize=7)
    else:
      ax.text(0.5, 0.5, "no data in these runs", ha="center", va="center",
              transform=ax.transAxes, color="gray")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  fig.savefig(output, dpi=100)
  plt.close(fig)
  return output


def main(workdirs):
  if not workdirs:
    raise errors.UserError("calm-plot needs at least one WORKDIR: calm-plot W1 [W2 ...] "
                           "--output curves.png")
  print(plot(workdirs, flags.FLAGS.output, flags.FLAGS.x))


def run():
  flags.DEFINE_string("output", "curves.png", "The PNG to write.")
  flags.DEFINE_enum("x", "step", list(X_AXES), "x-axis: step, training tokens or training "
                    "FLOPs (tokens x the logged flops_per_token).")
  cli.run_app(main, [], [__name__], takes_args=True)


if __name__ == "__main__":
  run()
