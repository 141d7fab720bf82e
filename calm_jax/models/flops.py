"""Analytic FLOPs per token of a train step, for every stage: weight matmuls, attention, the head with its N samples, the frozen encoder.

Counts the matrix multiplications the programs execute (2 FLOPs per multiply-add; norms,
softmax and other elementwise work are left out, a few % at the tiny size and less above):

  * weights: every Dense / projection of the trainable model, per position it runs on;
  * attention: Q K^T and A V over the whole block (the causal mask hides half of the
    square, but dense kernels compute it all, as PaLM's 12 L H Q T convention counts it);
  * head: CALM's generative head per position, with its num_model_samples (energy) or
    head_batch_mul (flow, diffusion) draws; the condition's share computed once;
  * frozen_encoder: CALM's frozen autoencoder encoding the target chunks (forward only).

A train step costs 3x the forward FLOPs of what it differentiates (forward, and a backward
pass twice as expensive) and 1x of the frozen encoder. Per token = per sequence / seq_len.
stages.train_flops_per_token picks the stage's function (ar_train, calm_train,
autoencoder_train).
XLA's cost analysis of the compiled step checks these numbers (tests/test_flops.py) where it
can: it counts a while-loop body (a scanned layer stack) once, so only an unrolled copy of
the step is comparable.
"""
from calm_jax.models.heads import common as head_common


def _mm(m, k, n=1):
  """FLOPs of an [m, k] x [k, n] product (m may be a count of rows)."""
  return 2 * m * k * n


def backbone_forward(c, positions):
  """(weights, attention) forward FLOPs of the Transformer over `positions` positions."""
  d = c.hidden // c.heads
  per_layer = _mm(positions, c.hidden, d * (2 * c.heads + 2 * c.kv_heads)) + _mm(
      positions, c.hidden, 3 * c.mlp)
  attention = 2 * _mm(positions, positions, c.heads * d)      # Q K^T and A V
  return c.layers * per_layer, c.layers * attention


def _ae_layers(c, rows):
  return _mm(rows, c.hidden, 3 * c.mlp) * (c.encoder_layers // 2)


def encoder_forward(ae, chunks):
  """The autoencoder's encoder on `chunks` chunks of K tokens (embedding lookups are free)."""
  k = ae.patch_size
  return (_ae_layers(ae, chunks * k) + _mm(chunks, k * ae.hidden, ae.hidden)
          + _ae_layers(ae, chunks) + _mm(chunks, ae.hidden, 2 * ae.latent_dim))


def decoder_forward(ae, chunks):
  """The autoencoder's decoder and tied vocabulary projection on `chunks` latents."""
  k, layers = ae.patch_size, _mm(1, ae.hidden, 3 * ae.mlp) * (ae.decoder_layers // 2)
  return (_mm(chunks, ae.latent_dim, ae.hidden) + chunks * layers
          + _mm(chunks, ae.hidden, k * ae.hidden) + chunks * k * layers
          + _mm(chunks * k, ae.hidden, ae.vocab_size))


def head_forward(c, positions):
  """The generative head's forward FLOPs on `positions` positions (training draws)."""
  d, l = head_common.width(c), c.latent_dim
  if c.head == "energy":
    per_sample = (_mm(1, c.noise_dim, d) + c.num_head_blocks * _mm(1, d, 5 * d)
                  + _mm(1, d, d) + _mm(1, d, l))
    once = _mm(1, c.hidden, d) + _mm(1, d, d) * c.num_head_blocks   # the condition, its shares
    score = _mm(c.num_model_samples, l, c.num_target_samples)   # sample-target distances
    return positions * (c.num_model_samples * per_sample + once + score)
  time_features = 256                                     # adaln_mlp.TIME_FREQ_DIM
  per_draw = (_mm(1, time_features, d) + _mm(1, d, d) + _mm(1, l, d)
              + c.num_head_blocks * _mm(1, d, 5 * d) + _mm(1, d, 2 * d) + _mm(1, d, l))
  return positions * (c.head_batch_mul * per_draw + _mm(1, c.hidden, d))


def _per_token(length, weights=0, attention=0, head=0, frozen_encoder=0):
  out = {"weights": weights / length, "attention": attention / length, "head": head / length,
         "frozen_encoder": frozen_encoder / length}
  out["total"] = sum(out.values())
  return out


def ar_train(c, length, ae=None):
  """The AR baseline's train FLOPs per token: {'weights', 'attention', 'head', 'frozen_encoder',
  'total'} (c: its model config; length: tokens per sequence)."""
  del ae
  weights, attention = backbone_forward(c, length - 1)
  return _per_token(length, 3 * (weights + _mm(length - 1, c.hidden, c.vocab_size)),
                    3 * attention)


def calm_train(c, length, ae):
  """CALM's train FLOPs per token (see ar_train); ae: the frozen autoencoder's model config."""
  k = c.patch_size
  positions = length // k - 1                             # chunks 0..T-2 predict 1..T-1
  weights, attention = backbone_forward(c, positions)
  compress = _mm(positions, k * c.hidden, 2 * c.hidden) + _mm(positions, 2 * c.hidden, c.hidden)
  return _per_token(length, 3 * (weights + compress), 3 * attention,
                    3 * head_forward(c, positions), encoder_forward(ae, positions))


def autoencoder_train(c, length, ae=None):
  """The autoencoder's train FLOPs per token (see ar_train)."""
  del ae
  chunks = length // c.patch_size
  return _per_token(length, 3 * (encoder_forward(c, chunks) + decoder_forward(c, chunks)))
