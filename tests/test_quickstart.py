"""calm-quickstart end to end in its --small form (killed twice on the way), re-run reuse, and calm-eval's JSON keys on its AE and CALM runs."""
import json
import os
import signal
import time

import jax
import matplotlib.image
import pytest

from calm_jax.eval import diagnose
from calm_jax.cli import eval as cli_eval
from calm_jax.eval import evaluator
from calm_jax.cli import quickstart
from calm_jax import config as config_lib
from calm_jax import errors
from tests.test_reliability import _rows

pytestmark = pytest.mark.e2e


def _kill_during(fork_server, workdir, stage, min_step):
  """Starts calm-quickstart --small and kills it (-9) once `stage` logged min_step."""
  proc = fork_server.start("calm-quickstart", ["--small", "--workdir", workdir],
                           f"{workdir}.killed.log")
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    if any(r["step"] >= min_step for r in _rows(os.path.join(workdir, stage))):
      break
    time.sleep(0.05)
  proc.kill()
  assert proc.wait() == -signal.SIGKILL, open(f"{workdir}.killed.log").read()[-3000:]


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory, fork_server):
  """The quickstart killed during the autoencoder stage, then during CALM, then finished."""
  workdir = str(tmp_path_factory.mktemp("quickstart"))
  _kill_during(fork_server, workdir, "autoencoder", 3)
  _kill_during(fork_server, workdir, "calm", 2)
  summary = quickstart.run_quickstart(workdir, small=True, devices=jax.devices()[:1])
  return workdir, summary


def test_a_killed_quickstart_finishes_each_stage_before_the_next(quickstart_dir):
  """Issue 14 item 3: CALM started on the finished autoencoder and recorded exactly that one."""
  workdir, _ = quickstart_dir
  ae_steps = quickstart.PROFILES["small"]["ae_steps"]
  assert max(r["step"] for r in _rows(os.path.join(workdir, "autoencoder"))) == ae_steps
  calm = config_lib.load_config(os.path.join(workdir, "calm"))
  assert calm.autoencoder.step == ae_steps and calm.autoencoder.digest


def test_quickstart_writes_a_summary(quickstart_dir):
  workdir, summary = quickstart_dir
  with open(os.path.join(workdir, "summary.json")) as f:
    saved = json.load(f)
  assert saved["autoencoder_steps"] == quickstart.PROFILES["small"]["ae_steps"]
  assert saved["calm_steps"] == quickstart.PROFILES["small"]["calm_steps"]
  for key in ("autoencoder_token_accuracy", "calm_brierlm", "calm_brier1", "calm_energy_loss",
              "sample", "sample_tokens_per_s"):
    assert key in saved, key
  assert 0.0 <= saved["autoencoder_token_accuracy"] <= 1.0
  assert saved == json.loads(json.dumps(summary))


def test_quickstart_trains_both_stages_at_its_profiles_chunk_size(quickstart_dir):
  """The profile's K and latent size reach the autoencoder and CALM runs (and the summary), its
  constant energy exponent the CALM run."""
  workdir, summary = quickstart_dir
  small = quickstart.PROFILES["small"]
  assert summary["chunk_size_K"] == small["K"]
  for stage in ("autoencoder", "calm"):
    model = config_lib.load_config(os.path.join(workdir, stage)).model
    assert (model.patch_size, model.latent_dim) == (small["K"], small["latent_dim"]), stage
  calm = config_lib.load_config(os.path.join(workdir, "calm")).model
  assert (calm.beta, calm.beta_start, calm.beta_anneal_steps) == (small["calm_beta"],) * 2 + (0,)


def test_quickstart_leaves_the_training_curves(quickstart_dir):
  workdir, _ = quickstart_dir
  image = matplotlib.image.imread(os.path.join(workdir, "curves.png"))
  assert image.shape[0] > 400 and image.shape[1] > 800
  with open(os.path.join(workdir, "calm", f"eval_step_{quickstart.PROFILES['small']['calm_steps']}"
                         ".json")) as f:
    assert "brierlm" in json.load(f)        # where calm-plot finds the BrierLM point


def test_calm_eval_json_keys_for_autoencoder_and_calm_runs(quickstart_dir, tmp_path):
  workdir, _ = quickstart_dir
  (ae,) = cli_eval.main_eval(os.path.join(workdir, "autoencoder"), max_tokens=64,
                             output=str(tmp_path / "ae.json"))
  assert {"token_accuracy", "token_accuracy_noisy", "kl", "num_tokens", "step", "workdir",
          "block_len"} <= set(ae)
  assert set(ae["token_accuracy_noisy"]) == {"0.3", "0.5"}
  with open(tmp_path / "ae.json") as f:
    assert json.load(f)["step"] == ae["step"]
  (calm,) = cli_eval.main_eval(os.path.join(workdir, "calm"), max_tokens=64,
                               output=str(tmp_path / "calm.json"))
  assert {"brier1", "brier2", "brier3", "brier4", "brierlm", "energy_loss", "num_tokens",
          "step", "workdir", "block_len"} <= set(calm)


def test_rerun_reuses_finished_stages(quickstart_dir):
  workdir, summary = quickstart_dir
  start = time.perf_counter()
  again = quickstart.run_quickstart(workdir, small=True, devices=jax.devices()[:1])
  assert again["autoencoder_steps"] == summary["autoencoder_steps"]
  assert again["calm_steps"] == summary["calm_steps"]
  assert again["seconds"]["tokenizer"] < 1.0          # the tokenizer file was kept
  assert time.perf_counter() - start < 120


def test_summary_compares_calm_with_the_unigram_model(quickstart_dir):
  _, summary = quickstart_dir
  assert summary["calm_beats_unigram"] == (summary["calm_brier1"] > summary["unigram_brier1"])
  assert 0.0 < summary["unigram_brier1"] < 1.0
  assert summary["sample_temperature"] == 0.5


def test_calm_eval_reports_the_unigram_model_at_the_same_positions(quickstart_dir, tmp_path):
  workdir, _ = quickstart_dir
  (calm,) = cli_eval.main_eval(os.path.join(workdir, "calm"), max_tokens=256,
                               output=str(tmp_path / "calm.json"), brier_samples=4)
  assert calm["brier_samples"] == 4
  assert set(calm["unigram"]) == {"brier1", "brier2", "brier3", "brier4", "brierlm"}
  assert calm["unigram"]["brier1"] > calm["unigram"]["brier2"] > 0
  assert "model/unigram" in evaluator.format_brier_comparison(calm)


def test_calm_diagnose_places_the_run_among_the_oracles(quickstart_dir):
  workdir, _ = quickstart_dir
  calm_dir = os.path.join(workdir, "calm")
  report = diagnose.diagnose(calm_dir, max_tokens=512, train_tokens=2048)
  energy, geometry = report["energy"], report["autoencoder"]
  assert energy["posterior"] < energy["marginal"]          # the true posterior is the floor
  assert energy["posterior"] < energy["model"]
  for key in ("accuracy_mean", "accuracy_posterior_sample", "accuracy_noise_0.3"):
    assert 0.0 <= geometry[key] <= 1.0
  assert geometry["posterior_std_median"] > 0
  assert 0.0 <= report["model_real_chunk_fraction"] <= 1.0
  assert report["verdict"].split(":")[0] in ("BRITTLE AUTOENCODER", "NO CONTEXT", "BELOW UNIGRAM",
                                             "LEARNS")
  assert report["eval"]["unigram"]["brier1"] > 0
  with open(os.path.join(calm_dir, "diagnose.json")) as f:
    assert json.load(f)["verdict"] == report["verdict"]
  assert "verdict:" in diagnose.format_report(report)
  with pytest.raises(errors.UserError, match="CALM"):
    diagnose.diagnose(os.path.join(workdir, "autoencoder"), max_tokens=256, train_tokens=256)
