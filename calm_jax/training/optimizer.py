"""AdamW with warmup, a constant or cosine schedule and global-norm clipping, from config.optim."""
import jax
import optax


def learning_rate_schedule(optim_config, total_steps):
  """Linear warmup to lr, then constant or cosine decay to lr * min_lr_ratio."""
  c = optim_config
  warmup = optax.linear_schedule(0.0, c.lr, max(c.warmup_steps, 1))
  if c.schedule == "constant":
    after = optax.constant_schedule(c.lr)
  else:
    decay_steps = max(total_steps - c.warmup_steps, 1)
    after = optax.cosine_decay_schedule(c.lr, decay_steps, alpha=c.min_lr_ratio)
  return optax.join_schedules([warmup, after], [c.warmup_steps])


def _decay_mask(params):
  """Weight decay on matrices only, not on norm scales or biases."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_config, total_steps):
  schedule = learning_rate_schedule(optim_config, total_steps)
  c = optim_config
  tx = optax.chain(
      optax.clip_by_global_norm(c.clip),
      optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                  mask=_decay_mask),
  )
  return tx, schedule
