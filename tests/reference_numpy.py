"""An independent float64 NumPy derivation of the reference CALM forward passes (test-only).

Written from the semantics of github.com/shaochenze/calm (models/modeling_autoencoder.py,
modeling_energy.py, modeling_calm.py at c556310) and of transformers 4.43's Llama, never
from calm_jax's modules: it reads PyTorch state dicts (Linear weights [out, in]) and
HF config kwargs, and returns the same `out/` arrays as the shared golden fixture
(../shared/data/reference_calm/). tests/test_reference_numpy.py checks it against
that fixture; tests/fixture_maker.py then uses it to write fixtures of other sizes.

Everything is float64 except what the reference itself rounds: the training-mode
Encoder casts its token embeddings to bfloat16, and LlamaRMSNorm then rounds its
normalised fp32 value back to that input dtype before the weight (`_bf16`).
"""
import math

import numpy as np

F64 = np.float64


def _bf16(x):
  """Rounds float32 values to bfloat16 (round to nearest even) and back, as torch .to(bfloat16)."""
  bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
  rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
  return rounded.astype(np.uint32).view(np.float32)


def linear(sd, name, x, bias=True):
  y = x @ np.asarray(sd[name + ".weight"], F64).T
  if bias:
    y = y + np.asarray(sd[name + ".bias"], F64)
  return y


def silu(x):
  return x / (1.0 + np.exp(-x))


def rms_norm(sd, name, x, eps, round_to_bf16=False):
  """LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) (fp32), cast to the input dtype, times w."""
  if round_to_bf16:        # the input was bfloat16: compute in fp32 as torch does, then round
    x32 = np.asarray(x, np.float32)
    var = np.mean(np.square(x32), axis=-1, keepdims=True, dtype=np.float32)
    normed = _bf16(x32 * (np.float32(1.0) / np.sqrt(var + np.float32(eps))))
    return np.asarray(sd[name + ".weight"], F64) * np.asarray(normed, F64)
  var = np.mean(np.square(x), axis=-1, keepdims=True)
  return np.asarray(sd[name + ".weight"], F64) * (x / np.sqrt(var + eps))


def layer_norm(sd, name, x, eps=1e-6):
  mean = np.mean(x, axis=-1, keepdims=True)
  var = np.mean(np.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * np.asarray(sd[name + ".weight"], F64) + np.asarray(
      sd[name + ".bias"], F64)


def llama_mlp(sd, name, x):
  return linear(sd, name + ".down_proj",
                silu(linear(sd, name + ".gate_proj", x, False)) * linear(sd, name + ".up_proj", x,
                                                                          False), False)


# -- Autoencoder ------------------------------------------------------------------------------
def ae_layer(sd, name, x, eps, bf16_input=False):
  """AELayer: x + LlamaMLP(RMSNorm(x))."""
  return x + llama_mlp(sd, name + ".mlp", rms_norm(sd, name + ".layernorm", x, eps, bf16_input))


def encoder(sd, cfg, ids_BxL, training=False, prefix="encoder."):
  """Encoder.forward: ids [B, L] -> latent [B, L/K, 2l]; intermediates keyed like the fixture."""
  k, eps = cfg["patch_size"], cfg["rms_norm_eps"]
  b, length = ids_BxL.shape
  t = length // k
  ids = ids_BxL.reshape(b * t, k)
  x = np.asarray(sd[prefix + "embed_tokens.weight"], F64)[ids]
  bf16 = training
  if bf16:
    x = np.asarray(_bf16(np.asarray(sd[prefix + "embed_tokens.weight"], np.float32)[ids]), F64)
  inter = {}
  half = cfg["num_encoder_layers"] // 2
  for stage in range(2):
    for j in range(half):
      i = stage * half + j
      x = ae_layer(sd, f"{prefix}encoder_layers.{i}", x, eps, bf16_input=bf16)
      bf16 = False                      # the residual sum is fp32 from here on
      inter[f"enc_layer{i}_out"] = x
    if stage == 0:
      x = x.reshape(b * t, 1, -1)
      inter["enc_squeeze_in"] = x
      x = linear(sd, prefix + "squeeze_layer", x)
      inter["enc_squeeze_out"] = x
  x = rms_norm(sd, prefix + "norm", x, eps)
  inter["enc_norm_out"] = x
  latent = linear(sd, prefix + "hidden_to_latent", x).reshape(b, t, -1)
  return latent, inter


def decoder(sd, cfg, z_BxTxl, prefix="decoder.", embed_key="encoder.embed_tokens.weight"):
  """Decoder.forward: z [B, T, l] -> logits [B, T*K, V] (tied to the encoder embedding)."""
  k, eps = cfg["patch_size"], cfg["rms_norm_eps"]
  b, t, _ = z_BxTxl.shape
  inter = {}
  x = linear(sd, prefix + "latent_to_hidden", z_BxTxl)
  inter["dec_latent_to_hidden_out"] = x
  half = cfg["num_decoder_layers"] // 2
  for stage in range(2):
    for j in range(half):
      i = stage * half + j
      inter[f"dec_layer{i}_in"] = x
      x = ae_layer(sd, f"{prefix}decoder_layers.{i}", x, eps)
      inter[f"dec_layer{i}_out"] = x
    if stage == 0:
      x = linear(sd, prefix + "expand_layer", x)
      inter["dec_expand_out"] = x
      x = x.reshape(b, t * k, -1)
  x = rms_norm(sd, prefix + "norm", x, eps)
  inter["dec_norm_out"] = x
  return x @ np.asarray(sd[embed_key], F64).T, inter


def _cross_entropy(logits_NxV, labels_N):
  m = logits_NxV.max(-1, keepdims=True)
  logz = (m + np.log(np.sum(np.exp(logits_NxV - m), -1, keepdims=True)))[:, 0]
  return np.mean(logz - logits_NxV[np.arange(len(labels_N)), labels_N])


def autoencoder_forward(sd, cfg, ids_BxL, eps_Nx1xl, training=False, token_u_NxK=None,
                        keep_Nx1xl=None):
  """Autoencoder.forward(input_ids, labels=input_ids): (logits [N*K, V], loss, kl, latent)."""
  k, p = cfg["patch_size"], cfg["ae_dropout"]
  ids = ids_BxL.reshape(-1, k)
  if training:
    ids = ids * (token_u_NxK > p)
  latent, _ = encoder(sd, cfg, ids, training=training)        # [N, 1, 2l]
  l = cfg["latent_size"]
  mean, log_std = latent[..., :l], latent[..., l:]
  std = np.exp(log_std)
  z = mean + np.asarray(eps_Nx1xl, F64) * std
  if training:
    z = z * (np.asarray(keep_Nx1xl, F64) / (1.0 - p))
  kl = 0.5 * (np.square(mean) + np.square(std) - 1.0 - 2.0 * log_std)
  kl = np.mean(np.sum(np.maximum(kl, cfg["kl_clamp"]), axis=-1))
  logits, _ = decoder(sd, cfg, z)
  logits = logits.reshape(-1, cfg["vocab_size"])
  loss = _cross_entropy(logits, ids_BxL.reshape(-1))
  if training:
    loss = loss * k + kl * cfg["kl_weight"]
  return logits, loss, kl, latent


# -- The Llama backbone -------------------------------------------------------------------------
def rope_tables(length, head_dim, theta):
  """LlamaRotaryEmbedding (default rope): cos, sin [L, head_dim] with emb = cat(freqs, freqs)."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                              / head_dim))
  inv_freq = np.asarray(inv_freq, np.float32)       # a float32 buffer in transformers
  freqs = np.arange(length, dtype=F64)[:, None] * np.asarray(inv_freq, F64)[None, :]
  emb = np.concatenate([freqs, freqs], axis=-1)
  return np.cos(emb), np.sin(emb)


def _rotate_half(x):
  h = x.shape[-1] // 2
  return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def attention(sd, name, x_BxLxD, cfg, cos, sin):
  b, length, d = x_BxLxD.shape
  heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  hd = d // heads
  q = linear(sd, name + ".q_proj", x_BxLxD, False).reshape(b, length, heads, hd)
  q = q.transpose(0, 2, 1, 3)
  kk = linear(sd, name + ".k_proj", x_BxLxD, False).reshape(b, length, kv, hd).transpose(0, 2, 1, 3)
  v = linear(sd, name + ".v_proj", x_BxLxD, False).reshape(b, length, kv, hd).transpose(0, 2, 1, 3)
  q = q * cos + _rotate_half(q) * sin
  kk = kk * cos + _rotate_half(kk) * sin
  rep = heads // kv                  # repeat_kv: query head h uses kv head h // rep
  kk, v = np.repeat(kk, rep, axis=1), np.repeat(v, rep, axis=1)
  scores = q @ kk.transpose(0, 1, 3, 2) / math.sqrt(hd)
  scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
  scores = np.exp(scores - scores.max(-1, keepdims=True))
  probs = scores / scores.sum(-1, keepdims=True)
  o = (probs @ v).transpose(0, 2, 1, 3).reshape(b, length, heads * hd)
  return linear(sd, name + ".o_proj", o, False)


def llama_model(sd, cfg, x_BxLxD, prefix="transformer."):
  """LlamaModel(inputs_embeds=x): per-layer outputs and the final-norm hidden states."""
  eps = cfg["rms_norm_eps"]
  length = x_BxLxD.shape[1]
  hd = cfg["hidden_size"] // cfg["num_attention_heads"]
  cos, sin = rope_tables(length, hd, cfg["rope_theta"])
  inter = {"rope_cos": cos[None], "rope_sin": sin[None]}
  x = x_BxLxD
  for i in range(cfg["num_hidden_layers"]):
    name = f"{prefix}layers.{i}"
    x = x + attention(sd, name + ".self_attn", rms_norm(sd, name + ".input_layernorm", x, eps),
                      cfg, cos, sin)
    x = x + llama_mlp(sd, name + ".mlp", rms_norm(sd, name + ".post_attention_layernorm", x, eps))
    inter[f"backbone_layer{i}_out"] = x
  h = rms_norm(sd, prefix + "norm", x, eps)
  inter["backbone_last_hidden"] = h
  return h, inter


# -- The energy head and loss ---------------------------------------------------------------------
def mlp_generator(sd, cfg, hidden_SxNxD, u_SxNxU, prefix="generative_head."):
  """MLPGenerator.sample with the uniform draws u (the head uses u - 0.5)."""
  inter = {}
  x = layer_norm(sd, prefix + "norm_noise",
                 linear(sd, prefix + "noise_embd", np.asarray(u_SxNxU, F64) - 0.5))
  y = layer_norm(sd, prefix + "norm_hidden", linear(sd, prefix + "hidden_embd", hidden_SxNxD))
  inter["head_norm_noise_out"], inter["head_norm_hidden_out"] = x, y
  for i in range(cfg["num_mlp_layers"]):
    name = f"{prefix}mlp_blocks.{i}"
    h = np.concatenate([layer_norm(sd, name + ".in_ln", x), y], axis=-1)
    h = linear(sd, name + ".linears.4",
               silu(linear(sd, name + ".linears.2", silu(linear(sd, name + ".linears.0", h)))))
    gate, up = np.split(h, 2, axis=-1)
    x = x + linear(sd, name + ".down_proj", silu(gate) * up)
    inter[f"head_block{i}_out"] = x
  h = layer_norm(sd, prefix + "final_layer.in_ln", x)
  out = linear(sd, prefix + "final_layer.linears.2",
               silu(linear(sd, prefix + "final_layer.linears.0", h)))
  return out, inter


def energy_score(x_SxNxl, mean_Nxl, log_std_Nxl, eps_MxNxl, beta):
  """EnergyTransformer.energy_score: mean_{i!=j} d(xi, xj) - 2 mean_{i,m} d(xi, ym) per position."""
  n = x_SxNxl.shape[0]
  dist = lambda a, b: np.power(np.sqrt(np.sum(np.square(a - b), axis=-1)), beta)
  dx = dist(x_SxNxl[:, None], x_SxNxl[None, :]).sum(axis=(0, 1)) / (n * (n - 1))
  y = mean_Nxl + np.asarray(eps_MxNxl, F64) * np.exp(log_std_Nxl)
  dy = dist(x_SxNxl[:, None], y[None, :]).mean(axis=(0, 1))
  return dx - 2.0 * dy


def brier_k_ge_4(logits1_BxLxV, logits2_BxLxV, targets_BxL, k):
  """CALM.eval_brier for patch_size >= 4: the mean of acc1 + acc2 - collision, Brier-1..4."""
  b = targets_BxL.shape[0]
  y = targets_BxL.reshape(b, -1, k)
  p1 = np.argmax(logits1_BxLxV, -1).reshape(y.shape)
  p2 = np.argmax(logits2_BxLxV, -1).reshape(y.shape)
  eq = lambda a, c: np.cumprod((a == c).astype(F64), axis=-1)
  return (eq(p1, y) + eq(p2, y) - eq(p1, p2)).mean(axis=(0, 1))[:4]


def calm_forward(sd, cfg, ae_cfg, ids_BxL, u_SxNxU, eps_MxNxl, training=False):
  """EnergyTransformer.forward(input_ids, labels=input_ids) with the saved draws: out/calm/*."""
  k = cfg["patch_size"]
  b, length = ids_BxL.shape
  t = length // k
  out = {}
  labels = ids_BxL[:, k:].reshape(1, -1)
  latent, _ = encoder(sd, ae_cfg, labels, training=training, prefix="ae_model.encoder.")
  out["target_encoder_latent"] = latent
  l = ae_cfg["latent_size"]
  mean, log_std = latent[0, :, :l], latent[0, :, l:]
  out["target_mean"], out["target_log_std"] = mean, log_std
  emb = np.asarray(sd["transformer.embed_tokens.weight"], F64)[ids_BxL].reshape(b, t, -1)[:, :-1]
  out["compress_in_concat_embeds"] = emb
  h = linear(sd, "embed_proj.2", silu(linear(sd, "embed_proj.0", emb)))
  out["compress_pre_layernorm"] = h
  h = layer_norm(sd, "embed_proj.3", h)
  out["compress_out"] = h
  hidden, inter = llama_model(sd, cfg, h)
  out.update(inter)
  hidden_NxD = hidden.reshape(b * (t - 1), -1)
  rep = np.broadcast_to(hidden_NxD, (cfg["num_samples"],) + hidden_NxD.shape)
  out["head_in_hidden_repeated"] = rep
  preds, inter = mlp_generator(sd, cfg, rep, u_SxNxU)
  out.update(inter)
  out["head_latent_predictions"] = preds
  score = energy_score(preds, mean, log_std, eps_MxNxl, cfg["beta"])
  out["energy_score"] = score
  out["loss"] = -np.mean(score)
  if not training and k >= 4:
    z = preds[:2].reshape(2, b, t - 1, -1)
    dec = lambda zz: decoder(sd, ae_cfg, zz, prefix="ae_model.decoder.",
                             embed_key="ae_model.encoder.embed_tokens.weight")[0]
    out["brier_logits_sample0"], out["brier_logits_sample1"] = dec(z[0]), dec(z[1])
    out["brier"] = brier_k_ge_4(out["brier_logits_sample0"], out["brier_logits_sample1"],
                                ids_BxL[:, k:], k)
  return out
