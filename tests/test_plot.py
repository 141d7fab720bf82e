"""calm-plot: PNGs of runs against steps, tokens and FLOPs from small fake workdirs (a real run: test_observability)."""
import json
import math
import os
import subprocess
import sys

import matplotlib.image
import pytest

from calm_jax import config as config_lib
from calm_jax import errors
from calm_jax.cli import plot
from tests import run_helpers

pytestmark = pytest.mark.unit


def _fake_run(workdir, experiment, flops_per_token, batch_size, evals=True):
  """A workdir as calm-train and calm-eval leave it: config.json, metrics.jsonl, eval_steps.jsonl."""
  config = run_helpers.tiny_run_config(experiment, "t.model", 400, train__batch_size=batch_size)
  config_lib.save_config(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in range(10, 101, 10):
      row = {"step": step, "loss": 6 * math.exp(-step / 40) + 2, "lr": 3e-4,
             "tokens_per_s": 1000.0 + step}
      if flops_per_token:
        row["flops_per_token"] = flops_per_token
      f.write(json.dumps(row) + "\n")
    f.write(json.dumps({"step": 50, "loss": 9.0}) + "\n")     # a resumed run logs step 50 again
  if evals:
    with open(os.path.join(workdir, "eval_steps.jsonl"), "w") as f:
      for step in (50, 100):
        f.write(json.dumps({"step": step, "brierlm": step / 10, "brier1": 0.1, "brier2": 0.05,
                            "brier3": 0.02, "brier4": 0.01}) + "\n")
  return workdir


@pytest.fixture
def two_runs(tmp_path):
  calm = _fake_run(str(tmp_path / "calm"), "calm.py:size=tiny", 1.5e6, batch_size=8)
  ar = _fake_run(str(tmp_path / "ar"), "ar_baseline.py:size=tiny", 2.5e6, batch_size=16,
                 evals=False)
  return calm, ar


@pytest.mark.parametrize("x_axis", plot.X_AXES)
def test_two_runs_draw_one_png_on_each_x_axis(two_runs, tmp_path, x_axis):
  output = plot.plot(list(two_runs), str(tmp_path / f"curves_{x_axis}.png"), x_axis)
  image = matplotlib.image.imread(output)
  assert image.shape == (850, 1500, 4)


def test_x_axes_scale_steps_by_tokens_and_flops(two_runs):
  calm, ar = (plot.Run(w) for w in two_runs)
  assert calm.x_scale("step") == 1.0
  assert calm.x_scale("tokens") == 8 * 32 and ar.x_scale("tokens") == 16 * 32
  assert calm.x_scale("flops") == 8 * 32 * 1.5e6
  assert calm.train["loss"][50] == 9.0                       # the last row of a step wins
  assert calm.evals["brierlm"] == {50: 5.0, 100: 10.0}


def test_flops_without_a_logged_flops_per_token_is_one_error(tmp_path):
  old = _fake_run(str(tmp_path / "old"), "ar_baseline.py:size=tiny", None, batch_size=8)
  with pytest.raises(errors.UserError, match=r"old/metrics.jsonl has no flops_per_token.*--x tokens"):
    plot.plot([old], str(tmp_path / "c.png"), "flops")


def test_the_command_line_writes_the_png_and_refuses_a_missing_workdir(tmp_path):
  old = _fake_run(str(tmp_path / "run"), "ar_baseline.py:size=tiny", None, batch_size=8)
  output = str(tmp_path / "out" / "curves.png")
  done = subprocess.run([sys.executable, "-m", "calm_jax.cli.plot", old, "--x", "tokens",
                         "--output", output], capture_output=True, text=True, timeout=120,
                        check=False)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == output and os.path.getsize(output) > 10_000
  missing = subprocess.run([sys.executable, "-m", "calm_jax.cli.plot", str(tmp_path / "nope")],
                           capture_output=True, text=True, timeout=120, check=False)
  assert missing.returncode == 1 and missing.stderr.strip().startswith("error:")
