"""Test-only: reference-CALM fixtures of any size, in the golden fixture's npz + json format.

make_fixture(path, **sizes) draws random reference state dicts (PyTorch key names and
layouts, written from the reference modules, not from calm_jax's key map), inputs and
every random draw, computes the out/ arrays with the independent float64 NumPy
derivation (tests/reference_numpy.py, itself checked against the shared golden
fixture) and writes FIXTURE.npz + FIXTURE.json. write_hf_dirs() turns a fixture into
the directories the reference's save_pretrained writes (config.json, model.safetensors
or pytorch_model.bin, a tokenizer), for the calm-convert tests.
"""
import json
import os

import numpy as np

from tests import reference_numpy as ref

AE_DEFAULTS = dict(ae_dropout=0.15, kl_clamp=0.5, kl_weight=0.001, patch_size=4, vocab_size=256,
                   hidden_size=64, intermediate_size=160, num_encoder_layers=2,
                   num_decoder_layers=2, latent_size=16, hidden_act="silu",
                   max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6,
                   pad_token_id=255, bos_token_id=1, eos_token_id=2, pretraining_tp=1,
                   tie_word_embeddings=False, mlp_bias=False)
CALM_DEFAULTS = dict(model_type="energy", patch_size=4, num_mlp_layers=1, num_samples=8,
                     beta=1.0, noise_size=8, vocab_size=256, hidden_size=64,
                     intermediate_size=160, num_hidden_layers=2, latent_size=16,
                     num_attention_heads=4, num_key_value_heads=4, hidden_act="silu",
                     max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6,
                     use_cache=True, pad_token_id=255, bos_token_id=1, eos_token_id=2,
                     pretraining_tp=1, tie_word_embeddings=False, rope_theta=10000.0,
                     rope_scaling=None, attention_bias=False, attention_dropout=0.0,
                     mlp_bias=False)


class _Init:
  """The golden fixture's init scheme: N(0, 1/fan_in) weights, O(0.1) biases and norm offsets."""

  def __init__(self, seed):
    self.rng = np.random.default_rng(seed)
    self.sd = {}

  def linear(self, key, out, inp, bias=True):
    self.sd[key + ".weight"] = self.rng.normal(0, 1 / np.sqrt(inp), (out, inp)).astype(np.float32)
    if bias:
      self.sd[key + ".bias"] = (0.1 * self.rng.normal(size=out)).astype(np.float32)

  def norm(self, key, dim, bias=False):
    self.sd[key + ".weight"] = (1 + 0.1 * self.rng.normal(size=dim)).astype(np.float32)
    if bias:
      self.sd[key + ".bias"] = (0.1 * self.rng.normal(size=dim)).astype(np.float32)

  def mlp(self, key, hidden, inter):
    self.linear(key + ".gate_proj", inter, hidden, False)
    self.linear(key + ".up_proj", inter, hidden, False)
    self.linear(key + ".down_proj", hidden, inter, False)


def autoencoder_state_dict(c, seed):
  """Autoencoder.state_dict() of models/modeling_autoencoder.py for config kwargs c."""
  init, h, k, l = _Init(seed), c["hidden_size"], c["patch_size"], c["latent_size"]
  init.sd["encoder.embed_tokens.weight"] = init.rng.normal(size=(c["vocab_size"], h)).astype(
      np.float32)
  for i in range(c["num_encoder_layers"]):
    init.mlp(f"encoder.encoder_layers.{i}.mlp", h, c["intermediate_size"])
    init.norm(f"encoder.encoder_layers.{i}.layernorm", h)
  init.linear("encoder.hidden_to_latent", 2 * l, h)
  init.linear("encoder.squeeze_layer", h, k * h)
  init.norm("encoder.norm", h)
  init.sd["decoder.lm_head_weight"] = init.sd["encoder.embed_tokens.weight"]    # tied
  init.linear("decoder.latent_to_hidden", h, l)
  for i in range(c["num_decoder_layers"]):
    init.mlp(f"decoder.decoder_layers.{i}.mlp", h, c["intermediate_size"])
    init.norm(f"decoder.decoder_layers.{i}.layernorm", h)
  init.linear("decoder.expand_layer", k * h, h)
  init.norm("decoder.norm", h)
  return init.sd


def calm_state_dict(c, ae_sd, seed):
  """EnergyTransformer.state_dict() of models/modeling_energy.py (ae_model.* = the autoencoder)."""
  init, h = _Init(seed), c["hidden_size"]
  hd = h // c["num_attention_heads"]
  init.sd["transformer.embed_tokens.weight"] = init.rng.normal(size=(c["vocab_size"], h)).astype(
      np.float32)
  for i in range(c["num_hidden_layers"]):
    key = f"transformer.layers.{i}"
    init.linear(key + ".self_attn.q_proj", c["num_attention_heads"] * hd, h, False)
    init.linear(key + ".self_attn.k_proj", c["num_key_value_heads"] * hd, h, False)
    init.linear(key + ".self_attn.v_proj", c["num_key_value_heads"] * hd, h, False)
    init.linear(key + ".self_attn.o_proj", h, c["num_attention_heads"] * hd, False)
    init.mlp(key + ".mlp", h, c["intermediate_size"])
    init.norm(key + ".input_layernorm", h)
    init.norm(key + ".post_attention_layernorm", h)
  init.norm("transformer.norm", h)
  g = "mlp_generator"
  init.linear(g + ".noise_embd", h, c["noise_size"])
  init.linear(g + ".hidden_embd", h, h)
  init.norm(g + ".norm_hidden", h, bias=True)
  init.norm(g + ".norm_noise", h, bias=True)
  for i in range(c["num_mlp_layers"]):
    key = f"{g}.mlp_blocks.{i}"
    init.norm(key + ".in_ln", h, bias=True)
    init.linear(key + ".linears.0", h, 2 * h)
    init.linear(key + ".linears.2", h, h)
    init.linear(key + ".linears.4", 2 * h, h)
    init.linear(key + ".down_proj", h, h)
  init.norm(g + ".final_layer.in_ln", h, bias=True)
  init.linear(g + ".final_layer.linears.0", h, h)
  init.linear(g + ".final_layer.linears.2", c["latent_size"], h)
  for key in [k for k in init.sd if k.startswith(g + ".")]:
    init.sd["generative_head." + key[len(g) + 1:]] = init.sd[key]      # the same module
  init.linear("embed_proj.0", 2 * h, c["patch_size"] * h)
  init.linear("embed_proj.2", h, 2 * h)
  init.norm("embed_proj.3", h, bias=True)
  for key, value in ae_sd.items():
    init.sd["ae_model." + key] = value
  return init.sd


def _describe(name, array):
  return {"name": name, "shape": list(array.shape), "dtype": str(array.dtype),
          "meaning": "made by tests/fixture_maker.py", "produced_by": "tests/reference_numpy.py"}


def make_fixture(path, batch=2, length=32, seed=0, autoencoder=None, calm=None):
  """Writes PATH.npz and PATH.json for the given config kwargs overrides; returns the npz path."""
  ae_cfg = dict(AE_DEFAULTS, **(autoencoder or {}))
  calm_cfg = dict(CALM_DEFAULTS, **(calm or {}))
  for f in ("patch_size", "vocab_size", "latent_size"):
    calm_cfg[f] = ae_cfg[f]
  k, l = ae_cfg["patch_size"], ae_cfg["latent_size"]
  ae_sd = autoencoder_state_dict(ae_cfg, seed + 1)
  calm_sd = calm_state_dict(calm_cfg, ae_sd, seed + 2)
  rng = np.random.default_rng(seed + 3)
  ids = rng.integers(0, ae_cfg["vocab_size"], (batch, length)).astype(np.int64)
  n, t1 = batch * length // k, length // k - 1
  noise = {
      "noise/ae/eval_eps": rng.normal(size=(n, 1, l)),
      "noise/ae/train_token_u": rng.uniform(size=(n, k)),
      "noise/ae/train_eps": rng.normal(size=(n, 1, l)),
      "noise/ae/train_latent_dropout_keep": rng.uniform(size=(n, 1, l)) >= ae_cfg["ae_dropout"],
      "noise/calm/head_rand_u": rng.uniform(size=(calm_cfg["num_samples"], batch * t1,
                                                  calm_cfg["noise_size"])),
      "noise/calm/energy_target_eps": rng.normal(size=(100, batch * t1, l)),
  }
  noise = {key: v if v.dtype == bool else v.astype(np.float32) for key, v in noise.items()}
  out = {}
  lat, inter = ref.encoder(ae_sd, ae_cfg, ids)
  out["out/ae/encoder_latent"] = lat
  out["out/ae/latent_mean"], out["out/ae/latent_log_std"] = lat[..., :l], lat[..., l:]
  logits, dinter = ref.decoder(ae_sd, ae_cfg, lat[..., :l])
  out["out/ae/decoder_logits_from_mean"] = logits
  out.update({"out/ae/" + key: v for key, v in {**inter, **dinter}.items()})
  lg, loss, _, _ = ref.autoencoder_forward(ae_sd, ae_cfg, ids, noise["noise/ae/eval_eps"])
  out["out/ae/forward_eval_logits"], out["out/ae/forward_eval_loss"] = lg, loss
  lg, loss, kl, latent = ref.autoencoder_forward(
      ae_sd, ae_cfg, ids, noise["noise/ae/train_eps"], True, noise["noise/ae/train_token_u"],
      noise["noise/ae/train_latent_dropout_keep"])
  out.update({"out/ae/forward_train_logits": lg, "out/ae/forward_train_loss": loss,
              "out/ae/forward_train_kl_replicated": kl,
              "out/ae/forward_train_encoder_latent": latent})
  for prefix, training in (("out/calm/", False), ("out/calm_train/", True)):
    o = ref.calm_forward(calm_sd, calm_cfg, ae_cfg, ids, noise["noise/calm/head_rand_u"],
                         noise["noise/calm/energy_target_eps"], training=training)
    if training:
      o = {key: o[key] for key in ("target_encoder_latent", "target_mean", "target_log_std",
                                   "energy_score", "loss")}
    out.update({prefix + key: v for key, v in o.items()})
  arrays = {"in/input_ids": ids, "in/labels": ids.copy(), **noise}
  arrays.update({"params/ae/" + key: v for key, v in ae_sd.items()})
  arrays.update({"params/calm/" + key: v for key, v in calm_sd.items()})
  arrays.update({key: np.asarray(v, np.float32) for key, v in out.items()})
  np.savez(path + ".npz", **arrays)
  meta = {"made_by": "tests/fixture_maker.py",
          "config_kwargs": {"autoencoder": ae_cfg, "calm": calm_cfg},
          "arrays": [_describe(name, np.asarray(v)) for name, v in arrays.items()]}
  with open(path + ".json", "w") as f:
    json.dump(meta, f, indent=1)
  return path + ".npz"


# -- Fake reference checkpoint directories --------------------------------------------------
def train_tokenizer(directory, vocab_size, bos="<s>", eos="</s>", unk="<unk>", pad=None,
                    specials_last=False):
  """A small BPE tokenizer.json (+ tokenizer_config.json) trained on the built-in corpus.

  vocab_size counts every token; without `pad`, calm-convert must add [PAD] itself (as the
  reference's scripts do), so the tokenizer then has vocab_size - 1 tokens of its own.
  Its post-processor puts BOS before every text, like Llama-3's; specials_last puts BOS
  and EOS after the learned vocabulary, as Llama-3 does (128000, 128001).
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  from calm_jax.data import sources  # pylint: disable=g-import-not-at-top
  late = [bos, eos] if specials_last else []
  specials = [unk] + [s for s in (bos, eos) if s not in late] + ([pad] if pad else [])
  tok = tokenizers.Tokenizer(models.BPE(unk_token=unk))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  own = vocab_size - (0 if pad else 1)
  trainer = trainers.BpeTrainer(vocab_size=own - len(late), special_tokens=specials,
                                limit_alphabet=64, show_progress=False)
  texts = [t for _, t in zip(range(300), sources.iter_texts("builtin:python_docs"))]
  tok.train_from_iterator(texts, trainer)
  tok.add_special_tokens(late)
  tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
  if tok.get_vocab_size() != own:
    raise AssertionError(f"BPE trained {tok.get_vocab_size()} tokens, wanted {own}")
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = {"bos_token": bos, "eos_token": eos, "unk_token": unk,
            "tokenizer_class": "PreTrainedTokenizerFast"}
  if pad:
    config["pad_token"] = pad
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return directory


def _save_weights(state_dict, directory, fmt):
  if fmt == "safetensors":
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
              os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  elif fmt == "bin":
    import torch  # pylint: disable=g-import-not-at-top
    tensors, shared = {}, {}
    for key, value in state_dict.items():     # aliases share storage, as in the reference
      tensors[key] = shared.setdefault(id(value), torch.from_numpy(np.array(value)))
    torch.save(tensors, os.path.join(directory, "pytorch_model.bin"))
  else:
    raise ValueError(fmt)


def write_hf_dirs(npz_path, out_dir, fmt="safetensors", tokenizer_dir=None):
  """out_dir/ae and out_dir/calm as save_pretrained writes them, from a fixture; returns both."""
  arrays = np.load(npz_path)
  with open(os.path.splitext(npz_path)[0] + ".json") as f:
    meta = json.load(f)
  dirs = {}
  for kind, arch in (("ae", "Autoencoder"), ("calm", "EnergyTransformer")):
    directory = dirs[kind] = os.path.join(out_dir, kind)
    os.makedirs(directory, exist_ok=True)
    kwargs = meta["config_kwargs"]["autoencoder" if kind == "ae" else "calm"]
    config = dict(kwargs, architectures=[arch], torch_dtype="float32",
                  transformers_version="4.43.0")
    config["model_type"] = ""            # what the reference's to_dict() writes
    if kind == "calm":
      config["ae_path"] = "/nonexistent/ae_path"   # a training machine's path
    with open(os.path.join(directory, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
    prefix = f"params/{kind}/"
    sd, seen = {}, {}
    for key in arrays.files:
      if key.startswith(prefix):
        value = arrays[key]
        sd[key[len(prefix):]] = seen.setdefault(value.tobytes(), value)
    _save_weights(sd, directory, fmt)
    if tokenizer_dir:
      for name in os.listdir(tokenizer_dir):
        with open(os.path.join(tokenizer_dir, name), "rb") as src, open(
            os.path.join(directory, name), "wb") as dst:
          dst.write(src.read())
  return dirs["ae"], dirs["calm"]
