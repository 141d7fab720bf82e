r"""Why a small CALM's head samples a blob: the autoencoder's latent geometry and oracle-conditioned heads.

  python benchmarks/latent_geometry.py --autoencoder W1 [--train SPEC] [--valid SPEC] \
      [--head_steps 3000] [--conditions bigram,prefix1] [--output FILE]

W1 is a finished stage-1 run (experiments/autoencoder.py). Two measurements on chunks of
the concatenated token stream (the chunks CALM predicts), with the trainer's energy loss
(N = 8 samples, M = 100 posterior draws, beta = --beta, 1 by default):

  1. geometry: the energy loss of oracle heads that sample the posteriors of real training
     chunks: the marginal (any chunk), the bigram (chunks that followed the same token) and
     prefix-n (chunks that share the true chunk's first n tokens), beside the posterior (the
     floor). `*_frac` is the share of the marginal -> posterior span that the oracle closes:
     how much of the loss a head can win with that much knowledge of the next chunk;
  2. heads: a fresh energy head (calm_jax.models.heads.EnergyHead) trained on an oracle
     condition (an embedding of the previous token, or of the true chunk's first token) for
     --head_steps steps. Its energy loss, the accuracy of the first decoded token, the share
     of its samples that decode to a chunk seen in training, and its per-dimension sample std.

Measured result (benchmarks/RESULTS.md): with bigram knowledge the trained head matches the
bigram oracle's energy while its samples form a blob (0.3% decode to real chunks): at that
much information the energy score cannot tell a blob from the mixture of real chunks.
"""
import argparse
import collections
import json
import os
import sys
import time

if __package__ in (None, ""):         # `python benchmarks/latent_geometry.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

from benchmarks import bench_lib  # pylint: disable=g-import-not-at-top
from calm_jax import runs  # pylint: disable=g-import-not-at-top
from calm_jax.data import sources  # pylint: disable=g-import-not-at-top
from calm_jax.models import energy_score  # pylint: disable=g-import-not-at-top
from calm_jax.models.heads.energy import EnergyHead  # pylint: disable=g-import-not-at-top

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(os.path.dirname(bench_lib.REPO), "shared", "data")
NUM_SAMPLES, NUM_TARGETS, BLOCK = 8, 100, 1024


def stream_chunks(tokenizer, spec, num_chunks, k, eos_id):
  """num_chunks + 1 consecutive chunks [n, K] of the documents of `spec`, each ended by EOS."""
  ids = []
  for text in sources.iter_texts(spec):
    ids.extend(tokenizer.encode(text))
    ids.append(eos_id)
    if len(ids) >= (num_chunks + 1) * k:
      break
  return np.asarray(ids[:(num_chunks + 1) * k]).reshape(-1, k)


def energy_loss(x_NxPxl, mean_Pxl, std_Pxl, rng, beta=1.0):
  """The trainer's estimator (2 fidelity - diversity), averaged over positions."""
  total = 0.0
  for i in range(0, len(mean_Pxl), BLOCK):
    m, s = mean_Pxl[i:i + BLOCK], std_Pxl[i:i + BLOCK]
    y = m[None] + s[None] * rng.standard_normal((NUM_TARGETS,) + m.shape)
    fid, div = energy_score.energy_terms(jnp.asarray(x_NxPxl[:, i:i + BLOCK], jnp.float32),
                                         jnp.asarray(y, jnp.float32), beta)
    total += float(jnp.sum(2.0 * fid - div))
  return total / len(mean_Pxl)


class Split:
  """Chunks of one split with the frozen encoder's posteriors and the oracle keys."""

  def __init__(self, run, spec, num_chunks):
    k = run.config.model.patch_size
    chunks = stream_chunks(run.tokenizer, spec, num_chunks, k, run.tokenizer.eos_id)
    self.next, self.prev_last = chunks[1:], chunks[:-1, -1]
    encode = jax.jit(lambda p, t: run.model.apply({"params": p}, t, method=run.model.encode))
    means, log_stds = zip(*[encode(run.params, jnp.asarray(self.next[i:i + 4096], jnp.int32))
                            for i in range(0, len(self.next), 4096)])
    self.mean = np.concatenate([np.asarray(m) for m in means])
    self.std = np.exp(np.concatenate([np.asarray(s) for s in log_stds]))

  def keys(self, condition):
    """The oracle's knowledge per position: [P, n] token ids."""
    return {"bigram": self.prev_last[:, None], "prefix1": self.next[:, :1],
            "prefix2": self.next[:, :2]}[condition]


def matching_indices(train_keys, eval_keys, num, rng):
  """num training positions per eval position with the same key (random ones if unseen)."""
  by_key = collections.defaultdict(list)
  for i, key in enumerate(map(tuple, train_keys.tolist())):
    by_key[key].append(i)
  return np.stack([rng.choice(by_key[key], num) if by_key[key]
                   else rng.integers(0, len(train_keys), num)
                   for key in map(tuple, eval_keys.tolist())], axis=1)


def geometry(run, train, evals, rng, beta):
  """Oracle energies and their share of the marginal -> posterior span; decode accuracy."""
  dim = train.mean.shape[1]
  posterior_of = lambda idx: train.mean[idx] + train.std[idx] * rng.standard_normal(
      idx.shape + (dim,))
  heads = {"posterior": evals.mean[None] + evals.std[None] * rng.standard_normal(
               (NUM_SAMPLES,) + evals.mean.shape),
           "marginal": posterior_of(rng.integers(0, len(train.mean), (NUM_SAMPLES, len(evals.mean))))}
  for condition in ("bigram", "prefix1", "prefix2"):
    heads[condition] = posterior_of(matching_indices(train.keys(condition), evals.keys(condition),
                                                     NUM_SAMPLES, rng))
  out = {name: energy_loss(x, evals.mean, evals.std, rng, beta) for name, x in heads.items()}
  span = out["marginal"] - out["posterior"]
  for name in ("bigram", "prefix1", "prefix2"):
    out[f"{name}_frac"] = (out["marginal"] - out[name]) / span
  decode = decoder(run)
  for sigma in (0.0, 0.5, 0.8):
    z = evals.mean + sigma * rng.standard_normal(evals.mean.shape)
    out[f"accuracy_noise_{sigma:g}"] = float(np.mean(decode(z) == evals.next))
  out.update(posterior_std_median=float(np.median(evals.std)),
             mean_spread=float(np.mean(np.std(evals.mean, axis=0))))
  return out


def decoder(run):
  jitted = jax.jit(lambda p, z: jnp.argmax(run.model.apply({"params": p}, z,
                                                           method=run.model.decode), -1))
  return lambda z: np.concatenate([np.asarray(jitted(run.params, jnp.asarray(z[i:i + 4096],
                                                                             jnp.float32)))
                                   for i in range(0, len(z), 4096)])


class OracleHead(nn.Module):
  """An energy head whose condition is the sum of embeddings of the oracle's key tokens."""
  config: ml_collections.ConfigDict
  num_keys: int

  def setup(self):
    self.embeds = [nn.Embed(self.config.vocab_size, self.config.hidden, name=f"embed_{i}")
                   for i in range(self.num_keys)]
    self.head = EnergyHead(self.config)

  def condition(self, keys_PxN):
    return sum(embed(keys_PxN[:, i]) for i, embed in enumerate(self.embeds))

  def __call__(self, keys_PxN, mean_Pxl, log_std_Pxl):
    return self.head.loss(self.condition(keys_PxN), mean_Pxl, log_std_Pxl)[0]

  def sample(self, keys_PxN):
    return self.head.sample(self.condition(keys_PxN))


def train_head(run, train, evals, condition, args):
  """Trains an OracleHead on `condition`; its energy, decode accuracy and blob-ness."""
  model_cfg = run.config.model
  cfg = ml_collections.ConfigDict(dict(
      vocab_size=model_cfg.vocab_size, hidden=args.head_width, head_hidden=0,
      init_std=args.head_width ** -0.5,
      layer_norm_eps=1e-6, num_head_blocks=args.head_blocks, latent_dim=model_cfg.latent_dim,
      noise_dim=64, num_model_samples=NUM_SAMPLES, num_target_samples=NUM_TARGETS,
      beta=args.beta))
  tr_keys, ev_keys = train.keys(condition), evals.keys(condition)
  model = OracleHead(cfg, tr_keys.shape[1])
  log_std = np.log(train.std)
  rngs = lambda i: {"params": jax.random.key(0), "sample": jax.random.key(i)}
  params = model.init(rngs(1), jnp.asarray(tr_keys[:2]), train.mean[:2], log_std[:2])["params"]
  opt = optax.adamw(args.head_lr, b1=0.9, b2=0.95, weight_decay=0.1)

  @jax.jit
  def step(params, opt_state, keys, mean, log_std, key):
    loss_fn = lambda p: jnp.mean(model.apply({"params": p}, keys, mean, log_std,
                                             rngs={"sample": key}))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, rng = opt.init(params), np.random.default_rng(args.seed)
  start = time.perf_counter()
  for i in range(args.head_steps):
    idx = rng.integers(0, len(tr_keys), args.head_batch)
    params, opt_state, _ = step(params, opt_state, jnp.asarray(tr_keys[idx]), train.mean[idx],
                                log_std[idx], jax.random.key(i))
  sample = jax.jit(lambda p, keys, key: model.apply({"params": p}, keys, method=OracleHead.sample,
                                                    rngs={"sample": key}))
  x = np.stack([np.asarray(sample(params, jnp.asarray(ev_keys), jax.random.key(10**6 + s)))
                for s in range(NUM_SAMPLES)])
  tokens = decoder(run)(x[0])
  seen = {tuple(c) for c in train.next.tolist()}
  return dict(condition=condition, width=args.head_width, blocks=args.head_blocks,
              steps=args.head_steps, beta=args.beta,
              energy=energy_loss(x, evals.mean, evals.std, rng, args.beta),
              first_token_accuracy=float(np.mean(tokens[:, 0] == evals.next[:, 0])),
              real_chunk_fraction=float(np.mean([tuple(c) in seen for c in tokens.tolist()])),
              sample_std=float(np.mean(np.std(x, axis=0))),
              seconds=round(time.perf_counter() - start, 1))


def tables(result):
  g = result["geometry"]
  rows = [[name, bench_lib.fmt(g[name], ".3f"), bench_lib.fmt(g.get(f"{name}_frac"), ".3f")]
          for name in ("marginal", "bigram", "prefix1", "prefix2", "posterior")]
  out = [bench_lib.format_table(["oracle head", "energy loss", "share of span"], rows)]
  rows = [[h["condition"], h["width"], h["blocks"], h["steps"], bench_lib.fmt(h["energy"], ".3f"),
           bench_lib.fmt(g[h["condition"]], ".3f"), bench_lib.fmt(h["first_token_accuracy"], ".4f"),
           bench_lib.fmt(h["real_chunk_fraction"], ".4f"), bench_lib.fmt(h["sample_std"], ".3f")]
          for h in result["heads"]]
  if rows:
    out.append(bench_lib.format_table(
        ["trained on", "width", "blocks", "steps", "energy loss", "oracle's", "first-token acc",
         "real chunks", "sample std"], rows))
  return "\n\n".join(out)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--autoencoder", required=True, help="a finished stage-1 workdir")
  p.add_argument("--train", default=f"jsonl:{DATA}/corpus/train-*.jsonl")
  p.add_argument("--valid", default=f"jsonl:{DATA}/corpus/valid.jsonl")
  p.add_argument("--train_chunks", type=int, default=150_000)
  p.add_argument("--eval_chunks", type=int, default=4000)
  p.add_argument("--conditions", default="bigram,prefix1", help="oracle heads to train ('' none)")
  p.add_argument("--head_steps", type=int, default=3000)
  p.add_argument("--head_batch", type=int, default=256)
  p.add_argument("--head_width", type=int, default=128)
  p.add_argument("--head_blocks", type=int, default=1)
  p.add_argument("--head_lr", type=float, default=1e-3)
  p.add_argument("--beta", type=float, default=1.0,
                 help="energy score exponent: of the oracles' energies and of the heads' training")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", default=os.path.join(HERE, "latent_geometry.json"))
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  run = runs.open_run(args.autoencoder)
  train = Split(run, args.train, args.train_chunks)
  evals = Split(run, args.valid, args.eval_chunks)
  result = {"benchmark": "latent_geometry", "autoencoder": os.path.abspath(args.autoencoder),
            "args": vars(args), "machine": bench_lib.machine_info(),
            "geometry": geometry(run, train, evals, np.random.default_rng(args.seed), args.beta),
            "heads": []}
  for condition in filter(None, args.conditions.split(",")):
    result["heads"].append(train_head(run, train, evals, condition, args))
    bench_lib.write_json(args.output, result)
  bench_lib.finish(result, args.output, tables(result))


if __name__ == "__main__":
  main()
