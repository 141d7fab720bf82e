"""The train state, the pure train step shared by every stage, and the one jit of it (`jit_train_step`).

CALM's frozen autoencoder params live outside the train state (`frozen`): they
get no gradients and no optimizer moments. The train step skips an update whose
loss or gradients are not finite, counts it, and remembers the step, so a
saved state is never poisoned; the host decides whether to halt.

Weight EMA (config.train.ema_decay > 0): the state also carries an exponential moving average
of the params, updated after every step with the decay min(ema_decay, (1 + t) / (10 + t)) (the
warm-up keeps the init from dominating early averages). Evaluation, generation and export use it
(`eval_params`); the raw params keep training. A small-batch run's last weights carry the noise
of its last updates, and a generative head's samples pay for it.

Mixed precision: params (the master weights) and optimizer state stay float32; with a
bfloat16 model every weight matrix and embedding is cast to bfloat16 once per step
(`compute_params`), before the forward pass and any gradient-accumulation loop, instead of
inside every layer call of every microbatch; the gradients come back float32.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from calm_jax.parallel import sharding

@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar: updates attempted so far
  params: Any                # trainable params
  opt_state: Any
  skipped: jax.Array         # int32: updates skipped for non-finite loss/grads
  last_bad_step: jax.Array   # int32: the latest skipped step, -1 if none


@flax.struct.dataclass
class EmaTrainState(TrainState):
  """A TrainState with the params' moving average (config.train.ema_decay > 0); a subclass, so a
  run without one saves and restores the same tree as before the field existed."""
  ema_params: Any


def init_train_state(params, tx, ema_decay):
  """The state at step 0; with ema_decay > 0 the average starts at the initial params."""
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     skipped=jnp.zeros((), jnp.int32), last_bad_step=-jnp.ones((), jnp.int32))
  if ema_decay > 0:
    return EmaTrainState(**vars(state), ema_params=jax.tree.map(jnp.copy, params))
  return state


def with_params(state, params):
  """The state with other params (init_from); its average, if any, starts at them too."""
  state = state.replace(params=params)
  if isinstance(state, EmaTrainState):
    return state.replace(ema_params=jax.tree.map(jnp.copy, params))
  return state


def eval_params(state):
  """The params evaluation, generation and checkpoints' `params` item use: the EMA if any."""
  return state.ema_params if isinstance(state, EmaTrainState) else state.params


def _ema_update(ema, params, step, ema_decay):
  t = step.astype(jnp.float32)
  decay = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
  # e + (1 - decay) (p - e): exactly e while the params stay put (lr 0, a frozen part)
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)


def _rngs(rng):
  dropout, sample = jax.random.split(rng)
  return {"dropout": dropout, "sample": sample}


def compute_params(params, dtype):
  """Kernels and embeddings in the compute dtype (every layer casts them to it anyway)."""
  if jnp.dtype(dtype) == jnp.float32:
    return params

  def cast(path, x):
    name = getattr(path[-1], "key", None)
    return x.astype(dtype) if name in ("kernel", "embedding") and x.dtype == jnp.float32 else x

  return jax.tree_util.tree_map_with_path(cast, params)


def _microbatches(batch, num):
  """[B, ...] -> [num, B/num, ...]; each device keeps its own rows in every microbatch."""
  return jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1), batch)


def make_train_step(model, tx, schedule, grad_accum_steps, ema_decay):
  """train_step(state, frozen, batch, rng) -> (state, metrics); pure, for jax.jit."""

  def loss_fn(params, frozen, batch, rng, step):
    return model.apply({"params": {**params, **frozen}}, batch, train=True, step=step,
                       rngs=_rngs(rng))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, frozen, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    params = compute_params(state.params, model.dtype)
    frozen = compute_params(frozen, model.dtype)
    to_master = lambda g, p: g.astype(p.dtype)
    if grad_accum_steps == 1:
      (_, metrics), grads = grad_fn(params, frozen, batch, rng, state.step)
      grads = jax.tree.map(to_master, grads, state.params)
    else:
      def accumulate(grads_sum, xs):
        index, microbatch = xs
        (_, m), g = grad_fn(params, frozen, microbatch, jax.random.fold_in(rng, index),
                            state.step)
        return jax.tree.map(lambda s, g: s + to_master(g, s), grads_sum, g), m

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      xs = (jnp.arange(grad_accum_steps), _microbatches(batch, grad_accum_steps))
      grads, metrics = jax.lax.scan(accumulate, zeros, xs)
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
      metrics = jax.tree.map(lambda m: m.mean(0), metrics)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        skipped=state.skipped + (~finite).astype(jnp.int32),
        last_bad_step=jnp.where(finite, state.last_bad_step, state.step),
    )
    if isinstance(state, EmaTrainState):
      new_state = new_state.replace(ema_params=keep(
          _ema_update(state.ema_params, params, state.step, ema_decay), state.ema_params))
    metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step),
                   skipped_updates=new_state.skipped.astype(jnp.float32),
                   last_bad_step=new_state.last_bad_step.astype(jnp.float32))
    return new_state, metrics

  return train_step



def jit_train_step(parts, mesh, axis_rules, grad_accum_steps):
  """The train step jitted with the state's shardings (donated), for the loop, AOT and benchmarks.

  parts: training.state.build's dict. Signature: (state, frozen, batch, rng) -> (state, metrics).
  """
  replicated = sharding.replicated(mesh)
  return jax.jit(
      make_train_step(parts["model"], parts["tx"], parts["schedule"], grad_accum_steps,
                      parts["ema_decay"]),
      in_shardings=(parts["state_shardings"], parts["frozen_shardings"],
                    sharding.batch_sharding(mesh, axis_rules), replicated),
      out_shardings=(parts["state_shardings"], replicated),
      donate_argnums=(0,))
