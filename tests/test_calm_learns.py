"""CALM learns, measured against an oracle and the unigram baseline (not a falling loss).

* A synthetic corpus whose next chunk is a deterministic function of the previous one
  (tests/synthetic.py): K=4 CALM must reach Brier-1 > 0.9 on held-out documents in 1000
  steps. With the tiny recipe's exponent annealed from 1 to 0.25 over those 1000 steps: 0.994
  at 400 steps and 0.998 at 1000 on this table; 0.73 at 600, 0.835 at 800 and 0.998 at 1000
  on successor table 11 (constant beta 1: 0.96 at 600 here, 0.70 / 0.99 / 0.996 on table 11;
  constant 0.25 stalls at 0.73 there; the old recipe, l=32 and init 0.02, reaches 0.03).
* The built-in corpus: K=4 and K=1 CALM must beat the unigram model's Brier-1 on the
  held-out split. Both failed before the recipe fix (a spiky 32-dim latent space and a
  0.02 init at width 128: Brier-1 0.0065 vs unigram 0.0096).
Each trains on one CPU device with the tiny recipes, shortened.
"""
import jax
import pytest

from calm_jax.eval import evaluator
from calm_jax import runs
from calm_jax.training import loop
from tests import run_helpers
from tests import synthetic

pytestmark = pytest.mark.slow
SYMBOLS = 64


def _train(config, workdir):
  loop.train_and_evaluate(config, str(workdir), jax.devices()[:1])
  return str(workdir)


def _stage_configs(tokenizer_path, vocab, k, train_spec, eval_spec, seq_len, ae_steps, calm_steps,
                   calm_batch):
  ae = run_helpers.tiny_run_config(
      f"autoencoder.py:size=tiny,K={k}", tokenizer_path, vocab, data__train=train_spec,
      data__eval=eval_spec, data__seq_len=seq_len, eval__block_len=seq_len, train__steps=ae_steps,
      train__batch_size=32, optim__warmup_steps=20, checkpoint__every_steps=ae_steps,
      checkpoint__async_save=False, train__log_every=50)
  calm = run_helpers.tiny_run_config(
      f"calm.py:size=tiny,K={k}", tokenizer_path, vocab, data__train=train_spec,
      data__eval=eval_spec, data__seq_len=seq_len, eval__block_len=seq_len,
      train__steps=calm_steps, train__batch_size=calm_batch, optim__warmup_steps=20,
      checkpoint__every_steps=calm_steps, checkpoint__async_save=False, train__log_every=50)
  return ae, calm


def _evaluate(calm_dir, max_tokens):
  run = runs.open_run(calm_dir, devices=jax.devices()[:1])
  return evaluator.evaluate_run(run, max_tokens=max_tokens, progress=False)


def test_calm_predicts_a_deterministic_next_chunk(tmp_path, tiny_tokenizer_path):
  from tests.conftest import TINY_VOCAB  # pylint: disable=g-import-not-at-top
  train_spec = synthetic.successor_corpus(str(tmp_path / "train"), 100, 512, SYMBOLS,
                                          table_seed=7, seed=0)
  eval_spec = synthetic.successor_corpus(str(tmp_path / "eval"), 10, 512, SYMBOLS,
                                         table_seed=7, seed=1)
  ae, calm = _stage_configs(tiny_tokenizer_path, TINY_VOCAB, 4, train_spec, eval_spec,
                            seq_len=64, ae_steps=200, calm_steps=1000, calm_batch=32)
  calm.autoencoder.workdir = _train(ae, tmp_path / "ae")
  result = _evaluate(_train(calm, tmp_path / "calm"), max_tokens=2048)
  assert result["brier1"] > 0.9, result
  assert result["brier4"] > 0.8, result
  assert result["unigram"]["brier1"] < 0.05, result


# K, sequence length, autoencoder steps, CALM steps and batch, eval tokens, and the factor
# over the unigram Brier-1 required. Measured with the tiny recipe of 2026-12-07 at constant
# beta 1 (posterior-mean targets, 4 head samples; 76 s and 81 s on 2 quiet cores): K=4 2.4x
# (one standard error is ~0.25x on 16,384 tokens; 2.6x with the 100-sample targets, 1.2-1.5x
# at 400 steps); K=1 3.8x (4.8x with the 100-sample targets, 1.5x at 500 steps). With the
# annealed exponent these runs end at beta ~0.6 / ~0.4 and pass; the factors were not
# measured again.
BUILTIN_RUNS = [(4, 64, 600, 560, 32, 16_384, 1.8), (1, 32, 200, 800, 16, 2048, 2.0)]


@pytest.mark.parametrize("k,seq_len,ae_steps,calm_steps,calm_batch,eval_tokens,factor",
                         BUILTIN_RUNS)
def test_calm_beats_unigram_on_the_builtin_corpus(tmp_path, tiny_tokenizer_path, k, seq_len,
                                                  ae_steps, calm_steps, calm_batch, eval_tokens,
                                                  factor):
  from tests.conftest import TINY_VOCAB  # pylint: disable=g-import-not-at-top
  ae, calm = _stage_configs(tiny_tokenizer_path, TINY_VOCAB, k, "builtin:python_docs",
                            "builtin:python_docs:valid", seq_len=seq_len, ae_steps=ae_steps,
                            calm_steps=calm_steps, calm_batch=calm_batch)
  calm.autoencoder.workdir = _train(ae, tmp_path / "ae")
  result = _evaluate(_train(calm, tmp_path / "calm"), max_tokens=eval_tokens)
  assert result["brier1"] > factor * result["unigram"]["brier1"], result
