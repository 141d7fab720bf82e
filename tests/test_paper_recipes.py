"""recipe=paper reproduces the reference's train/*.sh (experiments/paper.py cites the lines)."""
import os
import re

import pytest

from calm_jax import config as config_lib
from calm_jax import stages
from experiments import paper

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(spec):
  return config_lib.load_config_file(os.path.join(ROOT, "experiments", spec))


def _common(config, batch, accum, block, steps, save):
  assert (config.train.batch_size, config.train.grad_accum_steps) == (batch, accum)
  assert (config.data.seq_len, config.eval.block_len, config.train.steps) == (block, block, steps)
  assert config.checkpoint.every_steps == save and config.train.eval_every == 1000
  assert config.train.compute_dtype == "bfloat16" and config.train.seed == 1
  o = config.optim
  assert (o.lr, o.schedule, o.warmup_steps, o.b1, o.b2, o.eps, o.weight_decay, o.clip) == (
      3e-4, "constant", 0, 0.9, 0.95, 1e-8, 0.1, 1.0)
  assert config.data.tokenizer == "llama3_tokenizer"
  assert config.data.vocab_size == config.model.vocab_size == 128_257
  assert config.data.eval == "jsonl:data/wikitext_document_level-test.json"
  stages.validate(config, require_autoencoder=False)


def test_autoencoder_recipe_is_train_autoencoder_sh():
  c = _load("autoencoder.py:recipe=paper")
  _common(c, 256, 4, 2048, 30_000, 10_000)
  m = c.model
  assert (m.hidden, m.mlp, m.encoder_layers, m.decoder_layers, m.latent_dim, m.patch_size) == (
      512, 1280, 2, 2, 128, 4)
  assert (m.kl_clip, m.kl_weight, m.latent_dropout, m.token_mask_rate, m.mask_id) == (
      0.5, 1e-3, 0.15, 0.15, 0)
  assert m.encoder_bf16_embeddings_in_training
  assert (c.data.packing, c.data.document_eos, c.data.pad_in_loss) == ("chunk_aligned", True, True)
  assert c.data.train == "jsonl:pile-uncopyrighted/train/0[01].text.jsonl"


@pytest.mark.parametrize("size,hidden,mlp,layers", [("M", 1024, 2752, 16), ("L", 1536, 4096, 16),
                                                    ("XL", 2560, 6880, 16)])
def test_calm_recipe_is_train_energy_sh(size, hidden, mlp, layers):
  c = _load(f"calm.py:size={size},recipe=paper")
  _common(c, 256, 8, 8192, 250_000, 50_000)
  m = c.model
  assert (m.hidden, m.mlp, m.layers, m.num_head_blocks, m.latent_dim, m.patch_size) == (
      hidden, mlp, layers, 4, 128, 4)
  assert (m.head, m.noise_dim, m.num_model_samples, m.num_target_samples, m.beta) == (
      "energy", 64, 8, 100, 1.0)
  assert m.targets_bf16_embeddings_in_training and m.layer_norm_eps == 1e-6
  assert (c.data.packing, c.data.document_eos) == ("concat", False)
  if size == "M":
    assert (m.heads, m.kv_heads) == (16, 16)                  # train_energy.sh line 23


def test_ar_recipe_is_train_ar_sh():
  c = _load("ar_baseline.py:size=S,recipe=paper")
  _common(c, 1024, 32, 2048, 250_000, 50_000)
  m = c.model
  assert (m.hidden, m.mlp, m.layers, m.heads, m.kv_heads) == (768, 2048, 12, 16, 16)
  assert (c.data.packing, c.data.document_eos) == ("concat", False)


def test_recipe_variants_are_checked():
  with pytest.raises(ValueError, match="size=M|L|XL"):
    _load("calm.py:recipe=paper")
  with pytest.raises(ValueError, match="size=S|M|L"):
    _load("ar_baseline.py:recipe=paper")
  with pytest.raises(ValueError, match="Unknown recipe"):
    _load("autoencoder.py:recipe=mine")
  assert _load("calm.py:size=tiny").train.compute_dtype == "float32"   # default recipe unchanged


@pytest.mark.parametrize("fn,script", [(paper.autoencoder, "train/train_autoencoder.sh"),
                                       (paper.calm, "train/train_energy.sh"),
                                       (paper.ar, "train/train_ar.sh")])
def test_docstrings_cite_the_script_and_its_lines(fn, script):
  assert fn.__doc__.startswith(script + ":")
  assert len(re.findall(r"\(l\.\d+", fn.__doc__)) >= 10
