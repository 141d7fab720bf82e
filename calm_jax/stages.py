"""The stage registry: autoencoder / calm / ar -> model, eval terms, eval result and sampler.

The one module that looks at config.stage. Everything that differs between the stages
is a field of its Stage; the trainer, the evaluator, the sampler and the converter ask
`stages.get(config)` and never compare stage names.

  autoencoder  Autoencoder (stage 1); eval: the model's own metrics (token accuracy, KL)
  calm         CALM over a frozen autoencoder run (stage 2); eval: likelihood-free Brier-n
               and the head's loss; sampling: likelihood-free temperature sampling
  ar           the token-level AR baseline; eval: the lower-variance Brier-n, cross-entropy
               and perplexity; sampling: softmax(logits / T) with optional top-k
"""
import dataclasses
import functools
import math
from typing import Any, Callable, Optional

from calm_jax import config as config_lib
from calm_jax import errors
from calm_jax.eval import brier
from calm_jax.eval import terms
from calm_jax.models import compute_dtype
from calm_jax.models import flops
from calm_jax.models.ar import ARLanguageModel
from calm_jax.models.autoencoder import Autoencoder
from calm_jax.models.calm import CALM
from calm_jax.sampling import decode

NAMES = ("autoencoder", "calm", "ar")


@dataclasses.dataclass(frozen=True)
class Stage:
  """What one stage is made of (see the module docstring).

  build(config, ae_model_config) -> the linen module; its __call__(batch, train) is the loss.
  eval_terms(model, config) -> f(params, batch, rng) -> ({name: array}, weight), jittable;
    the evaluator sums name * weight and weight over the batches (eval/terms.py).
  eval_result(totals, config) -> the metrics of those sums.
  chunk: tokens per prediction step (the unigram baseline's stride), None without Brier-n.
  sampler(model, config, sampling, ids) -> decode.Sampler, None when the stage cannot generate.
  train_flops(model_config, seq_len, ae_model_config) -> analytic train FLOPs per token
    (models/flops.py: {'weights', 'attention', 'head', 'frozen_encoder', 'total'}).
  """
  name: str
  needs_autoencoder: bool
  build: Callable[..., Any]
  eval_terms: Callable[..., Any]
  eval_result: Callable[..., dict]
  chunk: Optional[Callable[[Any], int]]
  sampler: Optional[Callable[..., Any]]
  train_flops: Callable[..., dict]
  validate: Callable[[Any, bool], None] = lambda config, require_autoencoder: None


def _brier_result(totals, config, loss_metrics):
  result = brier.result_from_sums(totals["brier_sums"], totals["brier_counts"])
  loss = float(totals["loss_sum"]) / max(float(totals["loss_count"]), 1.0)
  result.update(loss_metrics(loss, config))
  result["positions"] = [int(c) for c in totals["brier_counts"]]
  return result


def _autoencoder_result(totals, config):
  mean = lambda k: float(totals[k]) / max(float(totals["weight"]), 1.0)
  return {"token_accuracy": mean("token_accuracy"),
          "token_accuracy_noisy": {f"{s:g}": mean(f"token_accuracy_noise_{s:g}")
                                   for s in config.eval.noise_sigmas},
          "kl": mean("kl")}


def _validate_calm(config, require_autoencoder):
  require = config_lib.require
  require(bool(config.autoencoder.workdir) or not require_autoencoder,
          "config.autoencoder.workdir is empty: stage 2 needs a finished autoencoder run; "
          "pass --config.autoencoder.workdir=DIR.")
  require(config.model.head in ("energy", "flow", "diffusion"),
          f"config.model.head={config.model.head!r}: use 'energy', 'flow' or 'diffusion'.")
  require(0 < config.model.beta < 2,
          f"config.model.beta={config.model.beta}: the energy score is strictly proper only "
          "for beta in (0, 2).")
  require(0 < config.model.beta_start < 2 and config.model.beta_anneal_steps >= 0,
          f"config.model.beta_start={config.model.beta_start}, beta_anneal_steps="
          f"{config.model.beta_anneal_steps}: the exponent must stay in (0, 2) and the anneal "
          "length be >= 0 (0: beta from the first step).")
  require(config.model.head_hidden >= 0,
          f"config.model.head_hidden={config.model.head_hidden}: the generative head's width must "
          "be >= 1, or 0 for the backbone's hidden (the reference's).")
  require(config.model.num_model_samples >= 2,
          "config.model.num_model_samples must be >= 2 (the diversity term needs pairs).")
  require(config.model.target_std_scale >= 0,
          f"config.model.target_std_scale={config.model.target_std_scale}: the targets' "
          "posterior std is multiplied by it; use 1 (posterior samples) or 0 (the mean).")


def _build_calm(config, ae_model_config):
  if ae_model_config is None:
    raise ValueError("build_model: stage 'calm' needs ae_model_config, the config.model of "
                     "the autoencoder run in config.autoencoder.workdir.")
  return CALM(config.model, ae_model_config, dtype=compute_dtype(config))


def _calm_terms(model, config):
  return terms.brier_sum_terms(functools.partial(
      terms.calm_terms, model, num_samples=config.eval.brier_samples))


STAGES = {
    "autoencoder": Stage(
        name="autoencoder", needs_autoencoder=False,
        build=lambda config, _: Autoencoder(config.model, dtype=compute_dtype(config),
                                            noise_sigmas=tuple(config.eval.noise_sigmas)),
        eval_terms=lambda model, config: terms.model_metric_terms(model),
        eval_result=_autoencoder_result, chunk=None, sampler=None,
        train_flops=flops.autoencoder_train),
    "calm": Stage(
        name="calm", needs_autoencoder=True, build=_build_calm, eval_terms=_calm_terms,
        eval_result=functools.partial(
            _brier_result, loss_metrics=lambda loss, c: {f"{c.model.head}_loss": loss}),
        chunk=lambda config: config.model.patch_size, sampler=decode.calm_sampler,
        train_flops=flops.calm_train, validate=_validate_calm),
    "ar": Stage(
        name="ar", needs_autoencoder=False,
        build=lambda config, _: ARLanguageModel(config.model, dtype=compute_dtype(config)),
        eval_terms=lambda model, config: terms.brier_sum_terms(functools.partial(
            terms.ar_terms, model)),
        eval_result=functools.partial(_brier_result, loss_metrics=lambda loss, c: dict(
            cross_entropy=loss, perplexity=float(math.exp(min(loss, 700.0))))),
        chunk=lambda config: 1, sampler=decode.ar_sampler, train_flops=flops.ar_train),
}


def get(config):
  """The Stage of config.stage (a ConfigError naming the field otherwise)."""
  if config.stage not in STAGES:
    raise config_lib.ConfigError(f"config.stage={config.stage!r}: must be one of {NAMES}.")
  return STAGES[config.stage]


def train_flops_per_token(config, ae_model_config=None):
  """The stage's analytic train FLOPs per token (models/flops.py) at config.data.seq_len."""
  return get(config).train_flops(config.model, config.data.seq_len, ae_model_config)


def validate(config, require_autoencoder=True):
  """config.validate (the checks every stage shares) and the stage's own checks."""
  stage = get(config)
  config_lib.validate(config)
  stage.validate(config, require_autoencoder)
  return config


def build_model(config, ae_model_config=None):
  """The linen module of config.stage; ae_model_config: the stage-1 run's config.model (CALM)."""
  return get(config).build(config, ae_model_config)


def require(config, names, message):
  """Raises a UserError(message.format(stage=config.stage)) unless config.stage is in names."""
  if config.stage not in names:
    raise errors.UserError(message.format(stage=config.stage))


def check_autoencoder_compatible(calm_config, ae_config, ae_workdir):
  """Stage-2 config vs the stage-1 run it links to; raises before anything compiles."""
  if ae_config.stage != "autoencoder":
    raise config_lib.ConfigError(
        f"config.autoencoder.workdir={ae_workdir} is a {ae_config.stage!r} run, "
        "not an autoencoder run.")
  checks = [
      ("model.patch_size", calm_config.model.patch_size, ae_config.model.patch_size),
      ("model.latent_dim", calm_config.model.latent_dim, ae_config.model.latent_dim),
      ("model.vocab_size", calm_config.model.vocab_size, ae_config.model.vocab_size),
  ]
  for field, mine, theirs in checks:
    if mine != theirs:
      raise config_lib.ConfigError(
          f"config.{field}={mine} does not match the autoencoder in {ae_workdir} "
          f"({field}={theirs}); pass --config.{field}={theirs} or train a matching autoencoder.")


def same_stage(config, other):
  """Whether two configs are runs of the same stage."""
  return config.stage == other.stage

