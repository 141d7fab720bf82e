"""calm_jax == the reference PyTorch CALM, array by array, on the golden fixture and on fixtures of other sizes.

The golden fixture (../shared/data/reference_calm/, made by the reference code itself)
is converted with calm_jax.convert and run through calm_jax's modules with the
reference's own random draws injected (calm_jax/convert/reference_check.py); every one of
its out/ arrays must agree within 1e-5 of its scale. Fixtures of other sizes come from
tests/fixture_maker.py, whose float64 NumPy derivation is first checked against the
golden fixture here.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from calm_jax.cli import reference_check as cli_reference_check
from calm_jax.convert import reference_check
from tests import fixture_maker
from tests import reference_numpy as ref

pytestmark = pytest.mark.reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_DIR = os.path.join(ROOT, "..", "shared", "data", "reference_calm")
GOLDEN = os.path.join(FIXTURE_DIR, "calm_tiny_reference.npz")
needs_golden = pytest.mark.skipif(
    not os.path.exists(GOLDEN),
    reason=f"the golden fixture {GOLDEN} is absent (CI clones the repo with ../shared beside it)")
GOLDEN_OUTPUTS = (sorted(n for n in np.load(GOLDEN).files if n.startswith("out/"))
                  if os.path.exists(GOLDEN) else [])

# Fixtures of other sizes: every size the checker must not assume (see fixture_maker.py).
OTHER_SIZES = {
    "gqa_k2_4enc_2blocks": dict(
        batch=3, length=24, seed=5,
        autoencoder=dict(vocab_size=97, hidden_size=48, intermediate_size=80, patch_size=2,
                         latent_size=12, num_encoder_layers=4, rms_norm_eps=1e-5),
        calm=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, num_mlp_layers=2, noise_size=5,
                  num_samples=4, rope_theta=500000.0, rms_norm_eps=1e-5)),
    "mqa_k8_3blocks": dict(
        batch=2, length=40, seed=9,
        autoencoder=dict(vocab_size=130, hidden_size=32, intermediate_size=64, patch_size=8,
                         latent_size=24, num_decoder_layers=4),
        calm=dict(hidden_size=40, intermediate_size=72, num_hidden_layers=1,
                  num_attention_heads=5, num_key_value_heads=1, num_mlp_layers=3,
                  noise_size=16, num_samples=3, beta=1.5)),
    # rms_norm_eps far from the LayerNorms' fixed 1e-6: model.layer_norm_eps must stay apart.
    "rms_eps_1e-2": dict(seed=4, autoencoder=dict(rms_norm_eps=1e-2),
                         calm=dict(rms_norm_eps=1e-2)),
}


@pytest.fixture(scope="module")
def golden_rows():
  rows, _ = reference_check.run_check(GOLDEN)
  return {r[0]: r for r in rows}


@needs_golden
@pytest.mark.parametrize("name", GOLDEN_OUTPUTS)
def test_golden_fixture_array(golden_rows, name):
  _, shape, err, rel, ok, note = golden_rows[name]
  assert ok, f"{name} {list(shape)}: max abs err {err:.3e}, rel {rel:.3e} > 1e-5 {note}"


@needs_golden
def test_golden_fixture_covers_every_module():
  names = set(GOLDEN_OUTPUTS)
  for part in ("ae/enc_layer0_out", "ae/enc_squeeze_out", "ae/dec_expand_out",
               "ae/forward_train_logits", "ae/forward_train_kl_replicated",
               "calm/compress_out", "calm/rope_cos", "calm/backbone_layer1_out",
               "calm/head_block0_out", "calm/head_latent_predictions", "calm/energy_score",
               "calm/brier", "calm_train/loss", "brier_direct/brier"):
    assert "out/" + part in names
  assert len(names) == 48


@needs_golden
def test_numpy_derivation_reproduces_the_golden_fixture(tmp_path):
  """The generator of the other fixtures computes what the reference computed (~1e-6)."""
  arrays = np.load(GOLDEN)
  with open(GOLDEN.replace(".npz", ".json")) as f:
    kwargs = json.load(f)["config_kwargs"]
  ae_cfg, calm_cfg = kwargs["autoencoder"], kwargs["calm"]
  ae = {k[len("params/ae/"):]: arrays[k] for k in arrays.files if k.startswith("params/ae/")}
  calm = {k[len("params/calm/"):]: arrays[k] for k in arrays.files if k.startswith("params/calm/")}
  ids = arrays["in/input_ids"]
  got = {}
  lat, inter = ref.encoder(ae, ae_cfg, ids)
  got["out/ae/encoder_latent"] = lat
  got.update({"out/ae/" + k: v for k, v in inter.items()})
  logits, inter = ref.decoder(ae, ae_cfg, lat[..., :ae_cfg["latent_size"]])
  got["out/ae/decoder_logits_from_mean"] = logits
  got.update({"out/ae/" + k: v for k, v in inter.items()})
  _, loss, kl, latent = ref.autoencoder_forward(
      ae, ae_cfg, ids, arrays["noise/ae/train_eps"], True, arrays["noise/ae/train_token_u"],
      arrays["noise/ae/train_latent_dropout_keep"])
  got.update({"out/ae/forward_train_loss": loss, "out/ae/forward_train_kl_replicated": kl,
              "out/ae/forward_train_encoder_latent": latent})
  for prefix, training in (("out/calm/", False), ("out/calm_train/", True)):
    out = ref.calm_forward(calm, calm_cfg, ae_cfg, ids, arrays["noise/calm/head_rand_u"],
                           arrays["noise/calm/energy_target_eps"], training)
    got.update({prefix + k: v for k, v in out.items() if prefix + k in arrays.files})
  got = {name: value for name, value in got.items() if name in arrays.files}
  assert len(got) >= 40
  for name, value in got.items():
    want = arrays[name].astype(np.float64)
    err = np.max(np.abs(np.reshape(value, want.shape) - want)) / max(np.max(np.abs(want)), 1e-30)
    assert err < 2e-6, (name, err)


@pytest.fixture(scope="module")
def other_fixtures(tmp_path_factory):
  directory = tmp_path_factory.mktemp("fixtures")
  return {name: fixture_maker.make_fixture(str(directory / name), **sizes)
          for name, sizes in OTHER_SIZES.items()}


@pytest.mark.parametrize("name", sorted(OTHER_SIZES))
def test_fixture_of_other_sizes_passes(other_fixtures, name):
  rows, _ = reference_check.run_check(other_fixtures[name])
  failed = [(r[0], r[3], r[5]) for r in rows if not r[4]]
  assert not failed
  names = {r[0] for r in rows}
  calm = dict(fixture_maker.CALM_DEFAULTS, **OTHER_SIZES[name]["calm"])
  assert f"out/calm/backbone_layer{calm['num_hidden_layers'] - 1}_out" in names
  assert f"out/calm/head_block{calm['num_mlp_layers'] - 1}_out" in names
  k = dict(fixture_maker.AE_DEFAULTS, **OTHER_SIZES[name]["autoencoder"])["patch_size"]
  assert ("out/calm/brier" in names) == (k >= 4)    # the K < 4 Brier needs unrecorded draws


def test_a_broken_conversion_fails_the_check(other_fixtures, monkeypatch, capsys):
  """A q_proj weight left untransposed (a classic converter bug) must show, not pass."""
  from calm_jax.convert import keymap
  original = keymap.to_calm_jax

  def untransposed_q(rule, tensor, shape):
    if rule.key.endswith("layers.0.self_attn.q_proj.weight"):
      return np.asarray(tensor).reshape(shape[1:] if rule.layer is not None else shape)
    return original(rule, tensor, shape)

  monkeypatch.setattr(keymap, "to_calm_jax", untransposed_q)
  assert cli_reference_check.main([other_fixtures["gqa_k2_4enc_2blocks"]]) == 1
  out = capsys.readouterr().out
  failing = [line.split()[0] for line in out.splitlines() if line.endswith("FAIL")]
  assert "out/calm/backbone_layer0_out" in failing and "out/calm/loss" in failing
  assert not any(name.startswith("out/ae/") for name in failing)


def test_the_training_mode_bf16_targets_are_what_the_reference_computes(other_fixtures,
                                                                       monkeypatch):
  """Without model.targets_bf16_embeddings_in_training the training-mode targets differ."""
  from calm_jax.convert import hf_config
  original = hf_config.calm_config

  def without_quirk(hf, source):
    config = original(hf, source)
    config.model.targets_bf16_embeddings_in_training = False
    return config

  monkeypatch.setattr(hf_config, "calm_config", without_quirk)
  rows, _ = reference_check.run_check(other_fixtures["gqa_k2_4enc_2blocks"])
  failed = {r[0] for r in rows if not r[4]}
  assert "out/calm_train/target_mean" in failed
  assert not any(name.startswith("out/calm/") for name in failed)


@needs_golden
def test_command_line_table_and_exit_status():
  result = subprocess.run(
      [sys.executable, "-m", "calm_jax.cli.reference_check", os.path.relpath(GOLDEN, ROOT)],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].split()[:4] == ["array", "shape", "max", "abs"]
  assert sum(line.endswith(" ok") for line in lines) == 48
  assert lines[-1].startswith("48/48 arrays within 1e-05")


def test_unreadable_fixture_exits_2(tmp_path, capsys):
  assert cli_reference_check.main([str(tmp_path / "missing.npz")]) == 2
  assert "does not exist" in capsys.readouterr().err
