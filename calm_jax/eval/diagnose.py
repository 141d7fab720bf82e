"""Where a trained CALM run stands between oracles and baselines, with a one-line verdict (calm-diagnose).

A CALM run that "trains" can still have learned nothing: its energy loss falls while its
samples decode to junk. This tool measures the three things that decide it, on the eval
data (and a slice of the training data for the conditional oracles):

  1. the frozen autoencoder's geometry: decode accuracy of the posterior mean, of a
     posterior sample and under Gaussian noise sigma on the mean; posterior std, the
     spread of the means, the nearest other chunk. A brittle latent space (accuracy
     collapsing at the noise a head makes) cannot be modelled by any head;
  2. the energy loss (the trainer's estimator) of oracle heads beside the trained one:
     the true posterior (the floor), the marginal (posterior samples of random training
     chunks: what a head that ignores the context can reach), a Gaussian blob of the
     marginal, a Gaussian per previous token and the bigram chunk model (posterior
     samples of training chunks that followed the same token). The trained head's place
     between marginal and bigram says how much context it uses;
  3. Brier-1..4 and BrierLM (the calm-eval evaluator) beside the unigram model and the
     bigram chunk model, and a ridge probe R^2 of the backbone state for the next latent.

Prints the table and the verdict, and writes W/diagnose.json.
"""
import collections
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import runs
from calm_jax import stages
from calm_jax.data import pipeline
from calm_jax.eval import evaluator
from calm_jax.models import energy_score

NOISE_SIGMAS = (0.1, 0.3, 0.5, 1.0)
_BLOCK = 1024          # positions per energy-score evaluation (bounds the [M, P, l] samples)
_NN_CHUNKS = 2000      # distinct chunks whose nearest neighbour distances are measured
_RIDGE = 1.0           # ridge penalty of the probe (per unit of the standardised features)


def _positions(run, split, max_tokens):
  """Consecutive chunk pairs of `split`: backbone states, next-chunk posteriors and tokens."""
  model, params = run.model, run.params
  k = run.config.model.patch_size
  apply = lambda method: jax.jit(lambda p, x: model.apply({"params": p}, x, method=method))
  hidden, targets = apply(model.hidden_states), apply(model.targets)
  out = collections.defaultdict(list)
  seen = 0
  for batch in pipeline.make_iterator(run.config, run.tokenizer, split):
    tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["mask"])
    b, length = tokens.shape
    chunks_BxTxK = tokens.reshape(b, length // k, k)
    valid = (mask.reshape(b, length // k, k).min(-1) > 0)
    valid_pair = (valid[:, 1:] & valid[:, :-1]).reshape(-1)
    next_NxK = chunks_BxTxK[:, 1:].reshape(-1, k)
    mean, log_std = targets(params, next_NxK)
    h = np.asarray(hidden(params, tokens)).reshape(-1, run.config.model.hidden)
    out["h"].append(h[valid_pair])
    out["mean"].append(np.asarray(mean)[valid_pair])
    out["std"].append(np.exp(np.asarray(log_std))[valid_pair])
    out["next"].append(next_NxK[valid_pair])
    out["prev_last"].append(chunks_BxTxK[:, :-1, -1].reshape(-1)[valid_pair])
    seen += int(mask.sum())
    if seen >= max_tokens:
      break
  return {key: np.concatenate(value) for key, value in out.items()}


def make_decoder(run):
  """decode(z_Nxl) -> tokens_NxK: the frozen decoder's argmax, _BLOCK latents per jitted call."""
  jitted = jax.jit(lambda p, z: jnp.argmax(
      run.model.apply({"params": p}, z, method=run.model.decode_latent), -1))
  return lambda z_Nxl: np.concatenate([np.asarray(jitted(run.params, z_Nxl[i:i + _BLOCK]))
                                       for i in range(0, len(z_Nxl), _BLOCK)])


def autoencoder_geometry(decode, positions, rng):
  """Decode accuracy clean / sampled / under noise, and the scales of the latent space."""
  mean, std, tokens = positions["mean"], positions["std"], positions["next"]
  noise = lambda scale: (mean + scale * rng.standard_normal(mean.shape)).astype(np.float32)
  accuracy = lambda z: float(np.mean(decode(z) == tokens))
  out = {"accuracy_mean": accuracy(mean), "accuracy_posterior_sample": accuracy(noise(std))}
  for sigma in NOISE_SIGMAS:
    out[f"accuracy_noise_{sigma:g}"] = accuracy(noise(sigma))
  kl_Nxl = 0.5 * (np.square(mean) + np.square(std) - 1.0 - 2.0 * np.log(std))
  _, first = np.unique(tokens, axis=0, return_index=True)
  distinct = mean[first[:_NN_CHUNKS]]
  sq = np.sum(np.square(distinct[:, None] - distinct[None]), -1)
  np.fill_diagonal(sq, np.inf)
  out.update(posterior_std_median=float(np.median(std)),
             mean_spread=float(np.mean(np.std(mean, axis=0))),
             kl_per_dim=float(np.mean(kl_Nxl)),
             nearest_chunk_distance_median=float(np.median(np.sqrt(sq.min(1)))),
             posterior_noise_norm_median=float(np.median(np.linalg.norm(std, axis=-1))))
  return out


def _energy(x_SxPxl, mean_Pxl, std_Pxl, beta, num_targets, rng):
  """The trainer's energy loss (2 fidelity - diversity) averaged over positions."""
  total = 0.0
  for i in range(0, mean_Pxl.shape[0], _BLOCK):
    m, s = mean_Pxl[i:i + _BLOCK], std_Pxl[i:i + _BLOCK]
    y = m[None] + s[None] * rng.standard_normal((num_targets,) + m.shape)
    fidelity, diversity = energy_score.energy_terms(jnp.asarray(x_SxPxl[:, i:i + _BLOCK]),
                                                    jnp.asarray(y, jnp.float32), beta)
    total += float(jnp.sum(2.0 * fidelity - diversity))
  return total / mean_Pxl.shape[0]


def _bigram_indices(train, prev_last, num, rng):
  """num training positions per eval position that followed the same token (random if unseen)."""
  by_token = collections.defaultdict(list)
  for i, t in enumerate(train["prev_last"]):
    by_token[int(t)].append(i)
  n_train = len(train["prev_last"])
  return np.stack([rng.choice(by_token[int(t)], num) if by_token[int(t)]
                   else rng.integers(0, n_train, num) for t in prev_last], axis=1)


def _per_token_gaussian(train, vocab_size, blob_mean, blob_std):
  """Mean and std [V, l] of the next latent (posterior noise included) given the previous token.

  Tokens seen fewer than twice in the training slice get the marginal blob's.
  """
  dim = train["mean"].shape[1]
  count_V = np.bincount(train["prev_last"], minlength=vocab_size).astype(np.float64)
  sum_Vxl, sq_Vxl = np.zeros((vocab_size, dim)), np.zeros((vocab_size, dim))
  np.add.at(sum_Vxl, train["prev_last"], train["mean"])
  np.add.at(sq_Vxl, train["prev_last"], np.square(train["mean"]) + np.square(train["std"]))
  seen = count_V >= 2
  mean_Vxl = np.where(seen[:, None], sum_Vxl / np.maximum(count_V, 1)[:, None], blob_mean)
  var_Vxl = sq_Vxl / np.maximum(count_V, 1)[:, None] - np.square(mean_Vxl)
  std_Vxl = np.where(seen[:, None], np.sqrt(np.maximum(var_Vxl, 0.0)), blob_std)
  return mean_Vxl.astype(np.float32), std_Vxl.astype(np.float32)


def oracle_energies(run, train, evals, rng):
  """Energy loss of the oracle heads and of the trained head at the eval positions."""
  cfg = run.config.model
  n, m = cfg.num_model_samples, cfg.num_target_samples
  # The trainer's targets: posterior samples with the std scaled by target_std_scale.
  train = dict(train, std=train["std"] * cfg.target_std_scale)
  mean, std = evals["mean"], evals["std"] * cfg.target_std_scale
  p, dim = mean.shape
  gauss = lambda shape: rng.standard_normal(shape).astype(np.float32)
  posterior_of = lambda idx: train["mean"][idx] + train["std"][idx] * gauss(idx.shape + (dim,))
  blob_mean = train["mean"].mean(0)
  blob_std = np.sqrt(train["mean"].var(0) + np.mean(np.square(train["std"]), 0))
  bigram = _bigram_indices(train, evals["prev_last"], n, rng)
  cond_mean, cond_std = _per_token_gaussian(train, cfg.vocab_size, blob_mean, blob_std)
  cond_mean, cond_std = cond_mean[evals["prev_last"]], cond_std[evals["prev_last"]]
  sample = jax.jit(lambda prm, h, key: run.model.apply(
      {"params": prm}, h, method=run.model.sample_latent, rngs={"sample": key}))
  model_x = np.stack([np.concatenate([np.asarray(sample(run.params, evals["h"][i:i + _BLOCK],
                                                        jax.random.key(1000 * s + i)))
                                      for i in range(0, p, _BLOCK)]) for s in range(n)])
  heads = {
      "posterior": mean[None] + std[None] * gauss((n, p, dim)),
      "marginal": posterior_of(rng.integers(0, len(train["mean"]), (n, p))),
      "blob": blob_mean + blob_std * gauss((n, p, dim)),
      "bigram_gaussian": cond_mean[None] + cond_std[None] * gauss((n, p, dim)),
      "bigram": posterior_of(bigram),
      "model": model_x,
  }
  energies = {name: _energy(x, mean, std, cfg.beta, m, rng) for name, x in heads.items()}
  gap = energies["marginal"] - energies["bigram"]
  energies["model_gap_closed"] = (energies["marginal"] - energies["model"]) / gap if gap > 0 else 0.0
  energies["model_sample_std"] = float(np.mean(np.std(model_x, axis=0)))
  return energies, bigram, model_x[0]


def real_chunk_fraction(decode, train, z_Pxl):
  """Fraction of decoded head samples that are chunks seen in the training slice.

  A head whose samples fall between the latents of real chunks decodes them token by
  token into mixtures ("word salad"); this measures how often that does not happen.
  """
  seen = {tuple(c) for c in train["next"].tolist()}
  return float(np.mean([tuple(c) in seen for c in decode(z_Pxl).tolist()]))


def bigram_chunk_brier(train, evals, bigram_idx):
  """Brier-1..min(K, 4) of the bigram chunk model (two training chunks after the same token)."""
  n = min(evals["next"].shape[1], 4)
  x1, x2, y = (a[:, :n] for a in (train["next"][bigram_idx[0]], train["next"][bigram_idx[1]],
                                    evals["next"]))
  agree = lambda a, b: np.cumprod(a == b, axis=-1)
  est = agree(x1, y) * 1.0 + agree(x2, y) - agree(x1, x2)
  return {f"brier{i + 1}": float(v) for i, v in enumerate(est.mean(0))}


def probe_r2(train, evals):
  """R^2 on the eval positions of a ridge map from the backbone state to the next latent mean."""
  mu, sd = train["h"].mean(0), train["h"].std(0) + 1e-6
  features = lambda h: np.concatenate([(h - mu) / sd, np.ones((len(h), 1))], axis=1)
  x = features(train["h"])
  w = np.linalg.solve(x.T @ x + _RIDGE * np.eye(x.shape[1]), x.T @ train["mean"])
  residual = evals["mean"] - features(evals["h"]) @ w
  total = evals["mean"] - train["mean"].mean(0)
  return float(1.0 - np.sum(np.square(residual)) / np.sum(np.square(total)))


def verdict(report):
  """One line: what holds this run back, or that it learns (and how far it got)."""
  geo, energy, ev = report["autoencoder"], report["energy"], report["eval"]
  uni = ev["unigram"]["brier1"]
  ratio = ev["brier1"] / uni if uni > 0 else float("nan")
  if geo["accuracy_mean"] < 0.99 or geo["accuracy_noise_0.3"] < 0.95:
    return (f"BRITTLE AUTOENCODER: decode accuracy {geo['accuracy_mean']:.1%} clean, "
            f"{geo['accuracy_noise_0.3']:.1%} at sigma 0.3 (posterior std "
            f"{geo['posterior_std_median']:.3f}); no head can land that precisely. Retrain "
            "stage 1 with a larger model.latent_dim or kl_weight, or for more steps.")
  if energy["model"] >= energy["marginal"]:
    return (f"NO CONTEXT: the head's energy {energy['model']:.3f} is not below the marginal's "
            f"{energy['marginal']:.3f}; it has not learned even what ignores the context. "
            "Train longer or with larger batches; check model.init_std for the width.")
  if ev["brier1"] <= uni:
    return (f"BELOW UNIGRAM: Brier-1 {ev['brier1']:.4f} <= unigram {uni:.4f} although the "
            f"energy is below the marginal's; the head's samples decode badly: check the "
            "autoencoder's accuracy under noise.")
  return (f"LEARNS: Brier-1 {ev['brier1']:.4f} = {ratio:.1f}x unigram; the head closes "
          f"{energy['model_gap_closed']:.0%} of the energy gap from the marginal to the bigram "
          f"oracle; BrierLM {ev['brierlm']:.3f} (unigram {ev['unigram']['brierlm']:.3f}).")


def diagnose(workdir, max_tokens=20_000, train_tokens=200_000, seed=0, fill_config=None):
  """The full report of a CALM run (see the module docstring); also written to diagnose.json.

  fill_config: completes an older config.json (runs.open_run).
  """
  run = runs.open_run(workdir, fill_config=fill_config)
  stages.require(run.config, ("calm",), f"{workdir} is a {{stage!r}} run; calm-diagnose needs a "
                 "CALM (stage 2) run. For an autoencoder or AR run use calm-eval.")
  rng = np.random.default_rng(seed)
  evals = _positions(run, "eval", max_tokens)
  train = _positions(run, "train", train_tokens)
  energies, bigram_idx, model_z = oracle_energies(run, train, evals, rng)
  decode = make_decoder(run)
  report = {
      "workdir": os.path.abspath(workdir), "step": run.step,
      "positions": {"eval": int(len(evals["mean"])), "train": int(len(train["mean"]))},
      "autoencoder": autoencoder_geometry(decode, evals, rng),
      "energy": energies,
      "probe_r2": probe_r2(train, evals),
      "model_real_chunk_fraction": real_chunk_fraction(decode, train, model_z),
      "bigram_chunk_model": bigram_chunk_brier(train, evals, bigram_idx),
      "eval": evaluator.evaluate_run(run, max_tokens=max_tokens, seed=seed, progress=False),
  }
  report["verdict"] = verdict(report)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "diagnose.json"), "w") as f:
      json.dump(report, f, indent=2)
  return report


def format_report(report):
  """The report as aligned tables (autoencoder, energies, Brier vs baselines) and the verdict."""
  ev, big = report["eval"], report["bigram_chunk_model"]
  lines = ["autoencoder (next chunks of the eval data)"]
  lines += [f"  {k:<32} {v:.4f}" for k, v in report["autoencoder"].items()]
  lines.append("energy loss per position (lower is better; the trainer's estimator)")
  lines += [f"  {k:<32} {v:.4f}" for k, v in report["energy"].items()]
  lines.append(f"probe R^2 (backbone state -> next latent mean)  {report['probe_r2']:.4f}")
  lines.append(f"head samples decoding to a chunk seen in training  "
               f"{report['model_real_chunk_fraction']:.1%}")
  lines.append(f"{'':<10}{'model':>10}{'unigram':>10}{'bigram chunks':>15}")
  for n in range(1, 5):
    key = f"brier{n}"
    bigram = f"{big[key]:>15.4f}" if key in big else f"{'-':>15}"
    lines.append(f"{key:<10}{ev[key]:>10.4f}{ev['unigram'][key]:>10.4f}{bigram}")
  lines.append(f"{'brierlm':<10}{ev['brierlm']:>10.4f}{ev['unigram']['brierlm']:>10.4f}")
  lines.append(f"verdict: {report['verdict']}")
  return "\n".join(lines)

