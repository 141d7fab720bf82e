"""The CALM autoencoder (stage 1): K tokens <-> one l-dim Gaussian latent, trained as a robust VAE.

Encoder: embed K tokens, the first half of the residual MLP layers per token, flatten
K*D -> linear -> D, the second half, RMSNorm, linear to 2l = (mean, log_std).
Decoder mirrors it: linear l -> D, layers, linear D -> K*D, layers, RMSNorm and the
encoder's embedding (tied) to vocab logits. With decoder_layers=0 (the reference's
num_decoder_layers=0) the decoder is linear up to the RMSNorm's positive scale, so the set
of latents that decode a token at a position is convex: a point between chunks that share
a token decodes that token too. The four projections carry biases, as in the
paper's code; the MLPs do not. Params: 'embed', 'encoder', 'decoder'.

Training (train=True): 15% of input tokens become mask_id, z = mean + std * eps,
dropout on z, loss = K * CE + kl_weight * KL with the per-dim KL clipped from below.
With model.encoder_bf16_embeddings_in_training the encoder rounds its token embeddings
to bfloat16 in training, as the reference's Encoder does whenever it is in training mode.
Every random draw comes from `noise()`; `__call__(batch, train, noise=...)` takes them
from the caller instead (the reference-equivalence checks inject the reference's draws).
Metrics: loss, recon_loss (CE per real token), kl (clipped, as in the loss), kl_unclipped;
train: token_accuracy_train (of the noisy training reconstruction); eval: token_accuracy
(decode of the posterior mean), token_accuracy_sample, token_accuracy_noise_<sigma>.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.models.layers import MLP, Dense, Embed, RMSNorm, constrain
from calm_jax.models.losses import cross_entropy, masked_mean


class AELayer(nn.Module):
  """x + SwiGLU(RMSNorm(x)): the autoencoder's residual MLP layer."""
  config: object
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_NxKxD):
    c = self.config
    h = RMSNorm(c.norm_eps, dtype=self.dtype, name="norm")(x_NxKxD)
    h = MLP(c.hidden, c.mlp, c.init_std, dtype=self.dtype, name="mlp")(h)
    return constrain(x_NxKxD + h, ("batch", "length", "act_embed"))


def _stage_layers(n, field):
  if n % 2 or n < 0:
    raise ValueError(f"config.model.{field}={n}: the autoencoder splits its layers into two "
                     "equal stages around the squeeze/expand; use an even number >= 0.")
  return n // 2


def mask_tokens(u, tokens, rate, mask_id):
  """Replaces a token by mask_id unless its uniform draw u > rate (the reference's masking)."""
  return jnp.where(u > rate, tokens, mask_id)


def latent_dropout(z, keep, rate):
  """Dropout from a keep-mask: z * (keep / (1 - rate)), the formula of torch's F.dropout."""
  if rate == 0.0:
    return z
  return z * (jnp.asarray(keep, z.dtype) / (1.0 - rate))


def clipped_kl(mean_Nxl, log_std_Nxl, clip):
  """KL(N(mean, std^2) || N(0, 1)) per dim, clipped from below at clip, summed: kl_N."""
  kl_Nxl = 0.5 * (jnp.square(mean_Nxl) + jnp.exp(2.0 * log_std_Nxl) - 1.0 - 2.0 * log_std_Nxl)
  return jnp.sum(jnp.maximum(kl_Nxl, clip), axis=-1)


def _dense(c, features, axes, name, dtype, use_bias=True):
  return Dense(features, axes, c.init_std, use_bias=use_bias, dtype=dtype, name=name)


def _residual_layers(module, x, num_layers, field, middle):
  """The 2 * half AELayers layers_0.. of `module`, with middle(x) between the two halves."""
  half = _stage_layers(num_layers, field)
  layer = lambda i, x: AELayer(module.config, dtype=module.dtype, name=f"layers_{i}")(x)
  for i in range(half):
    x = layer(i, x)
  x = middle(x)
  for i in range(half, 2 * half):
    x = layer(i, x)
  return x


class _ResidualStack(nn.Module):
  """The encoder's and decoder's fields: the model config and the compute dtype."""
  config: object
  dtype: jnp.dtype = jnp.float32


class Encoder(_ResidualStack):
  """Token embeddings x_NxKxD -> (mean_Nxl, log_std_Nxl) in float32."""

  @nn.compact
  def __call__(self, x_NxKxD):
    c = self.config
    squeeze = lambda x: _dense(c, c.hidden, ("mlp", "embed"), "squeeze", self.dtype)(
        x.reshape(x.shape[0], 1, -1))            # the K token vectors become one
    x = _residual_layers(self, x_NxKxD, c.encoder_layers, "encoder_layers", squeeze)
    x = RMSNorm(c.norm_eps, dtype=self.dtype, name="norm")(x)
    latent = _dense(c, 2 * c.latent_dim, ("embed", "latent"), "to_latent", self.dtype)(x)
    mean, log_std = jnp.split(jnp.asarray(latent[:, 0], jnp.float32), 2, axis=-1)
    return mean, log_std


class Decoder(_ResidualStack):
  """z_Nxl -> normed hidden states h_NxKxD (the caller projects to the vocab)."""

  @nn.compact
  def __call__(self, z_Nxl):
    c = self.config
    expand = lambda x: _dense(c, c.patch_size * c.hidden, ("embed", "mlp"), "expand",
                              self.dtype)(x).reshape(x.shape[0], c.patch_size, c.hidden)
    x = _dense(c, c.hidden, ("latent", "embed"), "from_latent", self.dtype)(z_Nxl[:, None])
    x = _residual_layers(self, x, c.decoder_layers, "decoder_layers", expand)
    return RMSNorm(c.norm_eps, dtype=self.dtype, name="norm")(x)


class Autoencoder(nn.Module):
  """Stage-1 model. noise_sigmas: eval accuracies with Gaussian noise of these sigmas on z."""
  config: object
  dtype: jnp.dtype = jnp.float32
  noise_sigmas: tuple = ()

  def setup(self):
    c = self.config
    self.embed = Embed(c.vocab_size, c.hidden, c.init_std, dtype=self.dtype)
    self.encoder = Encoder(c, dtype=self.dtype)
    self.decoder = Decoder(c, dtype=self.dtype)

  def encode(self, tokens_NxK, bf16_embeddings=False):
    """(mean_Nxl, log_std_Nxl) of the posterior, float32; deterministic, no masking.

    bf16_embeddings: round the token embeddings to bfloat16 before the layers (what the
    reference's Encoder does in training mode; a no-op when computing in bfloat16).
    """
    x = self.embed(tokens_NxK)
    if bf16_embeddings:
      x = jnp.asarray(x, jnp.bfloat16)
    return self.encoder(constrain(x, ("batch", "length", "act_embed")))

  def decode(self, z_Nxl):
    """logits_NxKxV (compute dtype) of the K tokens, through the tied embedding."""
    logits = self.embed.attend(self.decoder(jnp.asarray(z_Nxl, self.dtype)))
    return constrain(logits, ("batch", "length", "act_vocab"))

  def _accuracy(self, z_Nxl, tokens_NxK, mask_NxK):
    logits = self.decode(jax.lax.stop_gradient(z_Nxl))
    return masked_mean(jnp.argmax(logits, axis=-1) == tokens_NxK, mask_NxK)

  def noise(self, num_chunks, train):
    """The random draws of one forward pass over num_chunks chunks.

    {'eps': [N, l] standard normal for z = mean + std * eps (rng stream 'sample'), and
    in training 'token_u': [N, K] uniform (a token is masked unless u > token_mask_rate)
    and 'latent_keep': [N, l] bool, P(True) = 1 - latent_dropout (stream 'dropout')}.
    """
    c = self.config
    out = {"eps": jax.random.normal(self.make_rng("sample"), (num_chunks, c.latent_dim),
                                    jnp.float32)}
    if train:
      token_rng, keep_rng = jax.random.split(self.make_rng("dropout"))
      out["token_u"] = jax.random.uniform(token_rng, (num_chunks, c.patch_size))
      out["latent_keep"] = jax.random.bernoulli(keep_rng, 1.0 - c.latent_dropout,
                                                (num_chunks, c.latent_dim))
    return out

  def __call__(self, batch, train=False, noise=None, step=None):
    """(loss, metrics); noise: the draws of `noise()` to use instead of fresh ones."""
    del step       # no loss schedule
    c = self.config
    k = c.patch_size
    if batch["tokens"].shape[-1] % k:
      raise ValueError(f"Autoencoder: the sequence length {batch['tokens'].shape[-1]} is not "
                       f"a multiple of config.model.patch_size={k}; fix config.data.seq_len.")
    tokens_NxK = jnp.asarray(batch["tokens"], jnp.int32).reshape(-1, k)
    mask_NxK = jnp.asarray(batch["mask"], jnp.float32).reshape(-1, k)
    chunk_valid_N = jnp.max(mask_NxK, axis=-1)          # all-padding chunks carry no loss
    if noise is None:
      noise = self.noise(tokens_NxK.shape[0], train)

    inputs_NxK = tokens_NxK
    if train:
      inputs_NxK = mask_tokens(noise["token_u"], tokens_NxK, c.token_mask_rate, c.mask_id)
    mean, log_std = self.encode(inputs_NxK,
                                bf16_embeddings=train and c.encoder_bf16_embeddings_in_training)
    std = jnp.exp(log_std)
    z = mean + jnp.asarray(noise["eps"], mean.dtype) * std
    if train:
      z = latent_dropout(z, noise["latent_keep"], c.latent_dropout)
    logits = self.decode(z)

    ce_NxK, correct_NxK = cross_entropy(logits, tokens_NxK)
    recon = masked_mean(ce_NxK, mask_NxK)
    kl = masked_mean(clipped_kl(mean, log_std, c.kl_clip), chunk_valid_N)
    loss = recon * k + c.kl_weight * kl

    metrics = {
        "loss": loss,
        "recon_loss": recon,
        "kl": kl,
        "kl_unclipped": masked_mean(clipped_kl(mean, log_std, -jnp.inf), chunk_valid_N),
    }
    if train:
      # Accuracy of the training reconstruction itself (masked input, noisy z): free, since
      # the posterior-mean accuracy would cost a second decode on the hot path.
      metrics["token_accuracy_train"] = masked_mean(correct_NxK, mask_NxK)
    else:
      metrics["token_accuracy"] = self._accuracy(mean, tokens_NxK, mask_NxK)
      metrics["token_accuracy_sample"] = masked_mean(correct_NxK, mask_NxK)
      for sigma in self.noise_sigmas:
        noise = jax.random.normal(self.make_rng("sample"), mean.shape, mean.dtype)
        metrics[f"token_accuracy_noise_{sigma:g}"] = self._accuracy(
            mean + sigma * noise, tokens_NxK, mask_NxK)
    return loss, metrics
