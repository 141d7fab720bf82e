"""The analytic FLOPs per token (models/flops.py) against XLA's count of an unrolled train step, and the peak table."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from calm_jax.models import flops
from calm_jax.parallel import peak
from calm_jax import stages
from calm_jax.stages import build_model
from experiments import ar_baseline, autoencoder, calm

pytestmark = pytest.mark.unit

SMALL = dict(vocab_size=256, hidden=64, mlp=192, layers=2, heads=4, kv_heads=2,
             scan_layers=False)        # XLA counts a scanned layer once: unroll for the check


def _configs(stage, head="energy", head_hidden=0):
  ae = autoencoder.get_config("size=tiny,K=4")
  ae.model.update(vocab_size=256, hidden=64, mlp=128, latent_dim=32)
  if stage == "autoencoder":
    return ae, None
  config = (ar_baseline if stage == "ar" else calm).get_config(
      "size=tiny" + ("" if stage == "ar" else f",head={head}"))
  config.model.update(SMALL)
  if stage == "calm":
    config.model.update(latent_dim=32, num_head_blocks=2, noise_dim=16, num_target_samples=16,
                        head_hidden=head_hidden)
  config.data.seq_len = 128
  return config, ae.model


def _xla_train_flops_per_token(config, ae_model):
  """XLA's FLOPs of loss + gradient w.r.t. the trainable params, per token (batch 2)."""
  model = build_model(config, ae_model)
  batch = {"tokens": jnp.ones((2, config.data.seq_len), jnp.int32),
           "mask": jnp.ones((2, config.data.seq_len), jnp.int32)}
  rngs = {"params": jax.random.key(0), "sample": jax.random.key(1), "dropout": jax.random.key(2)}
  params = nn.unbox(jax.eval_shape(lambda: model.init(rngs, batch)["params"]))
  frozen = {k: v for k, v in params.items() if k == "autoencoder"}
  trainable = {k: v for k, v in params.items() if k != "autoencoder"}
  loss = lambda p, f: model.apply({"params": {**p, **f}}, batch, train=True, rngs=rngs)[0]
  cost = jax.jit(jax.grad(loss)).lower(trainable, frozen).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"] / (2 * config.data.seq_len)


@pytest.mark.parametrize("stage,head,head_hidden", [
    ("ar", None, 0), ("calm", "energy", 0), ("calm", "flow", 0), ("autoencoder", None, 0),
    ("calm", "energy", 24), ("calm", "flow", 24)])      # a head narrower than the backbone's 64
def test_analytic_flops_match_xla_on_an_unrolled_step(stage, head, head_hidden):
  """Matmuls are what the analytic count holds; XLA adds norms, softmax and other
  elementwise work (a few % here), so the analytic count is a little lower, never higher."""
  config, ae_model = _configs(stage, head, head_hidden)
  analytic = stages.train_flops_per_token(config, ae_model)
  assert analytic["total"] == pytest.approx(sum(v for k, v in analytic.items() if k != "total"))
  xla = _xla_train_flops_per_token(config, ae_model)
  assert 0.88 * xla <= analytic["total"] <= 1.0 * xla, (analytic, xla)
  if stage == "calm":
    assert analytic["head"] > 0 and analytic["frozen_encoder"] > 0 and analytic["attention"] > 0


def test_energy_head_counts_its_samples_and_the_condition_once():
  """Doubling N doubles everything but the condition and its per-block shares."""
  c = _configs("calm")[0].model
  d, blocks = c.hidden, c.num_head_blocks
  once = 2 * d * d * (1 + blocks)
  one = flops.head_forward(c, 1)
  c.num_model_samples *= 2
  assert flops.head_forward(c, 1) - once == 2 * (one - once)


def test_peak_table_and_mfu():
  assert peak.peak_flops("NVIDIA H200") == peak.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert peak.peak_flops("TPU v5p") == peak.peak_flops("TPU v5") == 459e12
  assert peak.peak_flops("TPU v6 lite") == 918e12
  assert peak.peak_flops("cpu") is None and peak.mfu(1e9, 1e3, "cpu", 1) is None
  assert peak.mfu(1e9, 1e5, "NVIDIA H200", 2) == pytest.approx(1e14 / (2 * 989e12))


def _energy_loss_flops(c, positions=64):
  from calm_jax.models.heads.energy import EnergyHead
  head = EnergyHead(c)
  h = jnp.ones((positions, c.hidden))
  mean = jnp.zeros((positions, c.latent_dim))
  rngs = {"params": jax.random.key(0), "sample": jax.random.key(1)}
  params = jax.eval_shape(lambda: head.init(rngs, h, mean, mean, method=head.loss))
  fn = lambda p: head.apply(p, h, mean, mean, method=head.loss, rngs=rngs)[0].sum()
  cost = jax.jit(fn).lower(params).compile().cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"] / positions


def test_energy_head_computes_the_condition_share_once_per_position():
  """XLA's cost of 8 more samples is what the analytic count says 8 samples cost, plus their
  elementwise work (measured 1.10x): the condition's share of each fusion block is not
  recomputed per sample (that adds 2 D^2 per block per sample: 1.27x here)."""
  c = _configs("calm")[0].model
  analytic_one, xla_one = flops.head_forward(c, 1), _energy_loss_flops(c)
  c.num_model_samples *= 2
  analytic_delta = flops.head_forward(c, 1) - analytic_one
  xla_delta = _energy_loss_flops(c) - xla_one
  assert analytic_delta <= xla_delta <= 1.15 * analytic_delta, (analytic_delta, xla_delta)
