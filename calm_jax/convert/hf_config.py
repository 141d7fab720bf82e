"""The reference's config.json (AutoencoderConfig, CALMConfig) <-> calm_jax experiment configs.

Import: the kind of checkpoint comes from `architectures` as save_pretrained writes it
('Autoencoder', 'EnergyTransformer'), or failing that from the state-dict keys (the
reference's to_dict() leaves model_type empty). The calm_jax config is the experiment's
recipe=paper config (experiments/paper.py: what the reference trains with) with every
model field taken from config.json; fields calm_jax cannot honour (another activation,
biases in Llama layers, RoPE scaling, attention dropout, a head_dim that is not
hidden/heads, flow or diffusion heads) are errors naming the field.
Export: the reference's own fields, from the saved reference config.json when the
workdir was converted (so a round trip keeps every field) and from defaults otherwise.
"""
from calm_jax.convert import ConvertError
from calm_jax import config as config_lib

AUTOENCODER, CALM = "autoencoder", "calm"
ARCHITECTURES = {"Autoencoder": AUTOENCODER, "EnergyTransformer": CALM}
UNSUPPORTED_ARCHITECTURES = {"FlowTransformer": "flow", "DiffusionTransformer": "diffusion"}
TRANSFORMERS_VERSION = "4.43.0"      # the reference's requirements.txt


def detect_kind(hf_config, keys, source):
  """'autoencoder' or 'calm' for a config.json dict and the checkpoint's state-dict keys."""
  archs = hf_config.get("architectures") or []
  for arch in archs:
    if arch in ARCHITECTURES:
      kind = ARCHITECTURES[arch]
      break
    if arch in UNSUPPORTED_ARCHITECTURES:
      raise ConvertError(
          f"{source}: architectures={archs}: the reference's {UNSUPPORTED_ARCHITECTURES[arch]} "
          "head is not mapped onto calm_jax (its heads differ); only 'Autoencoder' and "
          "'EnergyTransformer' (the energy head) convert.")
  else:
    keys = set(keys)
    if any(k.startswith("mlp_generator.") for k in keys):
      kind = CALM
    elif any(k.startswith("generative_head.net.") for k in keys):
      raise ConvertError(f"{source}: the state dict holds generative_head.net.* (a flow or "
                         "diffusion head), which calm_jax does not map; only the energy head "
                         "converts.")
    elif "encoder.squeeze_layer.weight" in keys:
      kind = AUTOENCODER
    else:
      raise ConvertError(f"{source}: neither architectures={archs or None} nor the state-dict "
                         "keys say what this is; expected a reference Autoencoder or "
                         "EnergyTransformer checkpoint.")
  model_type = hf_config.get("model_type", "")
  if kind == CALM and model_type not in ("", "energy"):
    raise ConvertError(f"{source}: model_type={model_type!r} is not supported; calm_jax maps the "
                       "energy head only (model_type 'energy').")
  return kind


_REQUIRED = object()


def _get(hf, field, source, default=_REQUIRED):
  """config.json's field (the reference's default when it is absent or null, else an error)."""
  if hf.get(field) is not None:
    return hf[field]
  if default is _REQUIRED:
    raise ConvertError(f"{source}: config.json has no {field!r}; it is required.")
  return default


def _require(hf, field, allowed, source, default):
  value = hf.get(field, default)
  if value not in allowed:
    raise ConvertError(f"{source}: {field}={value!r} is not supported by calm_jax (it needs "
                       f"{' or '.join(repr(a) for a in allowed)}); this checkpoint cannot be "
                       "converted faithfully.")


def _check_common(hf, source):
  _require(hf, "hidden_act", ("silu",), source, "silu")
  _require(hf, "mlp_bias", (False,), source, False)


def _even_layers(value, field, source):
  if value < 0 or value % 2:
    raise ConvertError(f"{source}: {field}={value}; the reference uses layers 0..2*({value}//2)-1 "
                       "in two stages and calm_jax needs an even number >= 0.")
  return value


def _blocks_of_k(config):
  """The recipe's block lengths, rounded down to a multiple of the checkpoint's K."""
  k = config.model.patch_size
  config.data.seq_len -= config.data.seq_len % k
  config.eval.block_len -= config.eval.block_len % k
  return config


def autoencoder_config(hf, source):
  """The calm_jax stage-1 config (autoencoder.py:recipe=paper) with config.json's model."""
  _check_common(hf, source)
  config = config_lib.load_experiment("autoencoder.py:recipe=paper")
  vocab = _get(hf, "vocab_size", source)
  dropout = _get(hf, "ae_dropout", source, 0.15)
  config.model.update(
      vocab_size=vocab, patch_size=_get(hf, "patch_size", source),
      hidden=_get(hf, "hidden_size", source), mlp=_get(hf, "intermediate_size", source),
      encoder_layers=_even_layers(_get(hf, "num_encoder_layers", source), "num_encoder_layers",
                                  source),
      decoder_layers=_even_layers(_get(hf, "num_decoder_layers", source), "num_decoder_layers",
                                  source),
      latent_dim=_get(hf, "latent_size", source), kl_clip=_get(hf, "kl_clamp", source, 0.5),
      kl_weight=_get(hf, "kl_weight", source, 1e-3),
      latent_dropout=dropout, token_mask_rate=dropout,   # one ae_dropout drives both
      mask_id=0,                                         # input_ids * mask: dropped -> id 0
      norm_eps=_get(hf, "rms_norm_eps", source), init_std=_get(hf, "initializer_range", source,
                                                                0.02))
  config.data.vocab_size = vocab
  return _blocks_of_k(config)


def calm_config(hf, source):
  """The calm_jax stage-2 config (calm.py:size=M,recipe=paper) with config.json's model."""
  _check_common(hf, source)
  _require(hf, "attention_bias", (False,), source, False)
  _require(hf, "rope_scaling", (None,), source, None)
  _require(hf, "attention_dropout", (0, 0.0), source, 0.0)
  config = config_lib.load_experiment("calm.py:size=M,recipe=paper")
  hidden, heads = _get(hf, "hidden_size", source), _get(hf, "num_attention_heads", source)
  kv_heads = _get(hf, "num_key_value_heads", source, heads)
  if hf.get("head_dim") not in (None, hidden // heads):
    raise ConvertError(f"{source}: head_dim={hf['head_dim']} != hidden_size / num_attention_heads "
                       f"= {hidden // heads}; calm_jax derives head_dim from the two.")
  if hidden % heads or heads % kv_heads:
    raise ConvertError(f"{source}: hidden_size={hidden}, num_attention_heads={heads}, "
                       f"num_key_value_heads={kv_heads}: need hidden % heads == 0 and "
                       "heads % kv_heads == 0.")
  vocab = _get(hf, "vocab_size", source)
  beta = float(_get(hf, "beta", source, 1.0))
  config.model.update(
      vocab_size=vocab, patch_size=_get(hf, "patch_size", source), hidden=hidden,
      mlp=_get(hf, "intermediate_size", source), layers=_get(hf, "num_hidden_layers", source),
      heads=heads, kv_heads=kv_heads, rope_theta=float(_get(hf, "rope_theta", source, 10000.0)),
      norm_eps=_get(hf, "rms_norm_eps", source), init_std=_get(hf, "initializer_range", source,
                                                                0.02),
      latent_dim=_get(hf, "latent_size", source), head_hidden=0,   # as wide as the backbone
      num_head_blocks=_get(hf, "num_mlp_layers", source), noise_dim=_get(hf, "noise_size", source),
      num_model_samples=_get(hf, "num_samples", source), beta=beta, beta_start=beta,
      beta_anneal_steps=0,              # the reference trains with one exponent
      num_target_samples=100,           # EnergyTransformer.energy_score: n_y = 100 posterior
      target_std_scale=1.0,             # samples (std unscaled)
      layer_norm_eps=1e-6)              # every nn.LayerNorm of modeling_energy.py
  config.data.vocab_size = vocab
  return _blocks_of_k(config)


def to_calm_jax(kind, hf, source):
  return autoencoder_config(hf, source) if kind == AUTOENCODER else calm_config(hf, source)


# -- Export ---------------------------------------------------------------------------------------
def _special_ids(base, tokenizer):
  ids = {f: base.get(f) for f in ("bos_token_id", "eos_token_id", "pad_token_id")}
  if tokenizer is not None:
    ids.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
               pad_token_id=tokenizer.pad_id)
  return ids


def hf_autoencoder_config(config, base=None, tokenizer=None):
  """AutoencoderConfig.to_dict()'s fields for a calm_jax stage-1 config."""
  m = config.model
  if m.latent_dropout != m.token_mask_rate or m.mask_id != 0:
    raise ConvertError(
        f"config.model.latent_dropout={m.latent_dropout}, token_mask_rate={m.token_mask_rate}, "
        f"mask_id={m.mask_id}: the reference has one ae_dropout for both and masks to id 0, so "
        "this autoencoder's training setup has no reference config (its weights would still "
        "load); train with equal rates and mask_id=0 to export.")
  hf = dict(base or {})
  hf.update(
      architectures=["Autoencoder"], model_type=hf.get("model_type", ""),
      ae_dropout=m.latent_dropout, kl_clamp=m.kl_clip, kl_weight=m.kl_weight,
      patch_size=m.patch_size, vocab_size=m.vocab_size, hidden_size=m.hidden,
      intermediate_size=m.mlp, num_encoder_layers=m.encoder_layers,
      num_decoder_layers=m.decoder_layers, latent_size=m.latent_dim, hidden_act="silu",
      rms_norm_eps=m.norm_eps, initializer_range=m.init_std, mlp_bias=False,
      torch_dtype="float32")
  hf.setdefault("max_position_embeddings", 2048)
  hf.setdefault("pretraining_tp", 1)
  hf.setdefault("tie_word_embeddings", False)
  hf.setdefault("transformers_version", TRANSFORMERS_VERSION)
  hf.update(_special_ids(hf, tokenizer))
  return hf


def hf_calm_config(config, ae_path, base=None, tokenizer=None):
  """CALMConfig's fields for a calm_jax stage-2 config with the energy head."""
  m = config.model
  if m.head != "energy":
    raise ConvertError(f"config.model.head={m.head!r}: only the energy head has a reference "
                       "counterpart (EnergyTransformer) in calm_jax's mapping.")
  # num_target_samples, target_std_scale and the exponent's anneal (beta_start,
  # beta_anneal_steps; beta is its final value) shape only the training loss (the reference's
  # energy_score fixes 100 posterior samples and one beta): the exported network is the same.
  if m.head_hidden not in (0, m.hidden):
    raise ConvertError(f"config.model.head_hidden={m.head_hidden}: the reference's energy head is "
                       f"as wide as the backbone (hidden_size={m.hidden}); export a run with "
                       "head_hidden equal to model.hidden.")
  if m.layer_norm_eps != 1e-6:
    raise ConvertError(f"config.model.layer_norm_eps={m.layer_norm_eps}: the reference fixes "
                       "it at 1e-6.")
  hf = dict(base or {})
  hf.update(
      architectures=["EnergyTransformer"], model_type="energy", ae_path=ae_path,
      patch_size=m.patch_size, num_mlp_layers=m.num_head_blocks,
      num_samples=m.num_model_samples, beta=m.beta, noise_size=m.noise_dim,
      vocab_size=m.vocab_size, hidden_size=m.hidden, intermediate_size=m.mlp,
      num_hidden_layers=m.layers, latent_size=m.latent_dim, num_attention_heads=m.heads,
      num_key_value_heads=m.kv_heads, hidden_act="silu", rms_norm_eps=m.norm_eps,
      initializer_range=m.init_std, rope_theta=m.rope_theta, rope_scaling=None,
      attention_bias=False, attention_dropout=0.0, mlp_bias=False, torch_dtype="float32")
  for field, value in (("max_position_embeddings", 2048), ("use_cache", True),
                       ("pretraining_tp", 1), ("tie_word_embeddings", False),
                       ("transformers_version", TRANSFORMERS_VERSION)):
    hf.setdefault(field, value)
  hf.update(_special_ids(hf, tokenizer))
  return hf
