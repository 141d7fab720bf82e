r"""The check of calm_jax against a reference-CALM fixture: convert its weights, run, compare every out/ array.

  python -m calm_jax.cli.reference_check FIXTURE.npz [--json FIXTURE.json] [--tol 1e-5]

A fixture (format of ../shared/data/reference_calm/, README there) is an npz with the
reference's state dicts (params/ae/*, params/calm/*), inputs (in/), every random draw
the reference made (noise/) and its outputs (out/), and a json beside it whose
config_kwargs hold the reference configs. Nothing here assumes a size: vocabulary,
widths, K, latent size, layer and head-block counts, grouped-query attention,
rope_theta, batch and length are read from the json and the arrays.

The weights go through calm_jax.convert (the same key map and layouts as calm-convert),
the configs through its config.json mapping; the calm_jax modules then run on in/ with
the saved noise injected through their noise arguments (Autoencoder.__call__,
CALM.__call__, EnergyHead.loss/generate), in float32, the backbone unscanned so that
every layer's output can be read (flax capture_intermediates). One row per out/
array: max |ours - ref|, that divided by max |ref| (the error relative to the array's
scale), and pass iff the latter is <= --tol. The command exits 1 if any row fails (or an
out/ array has no calm_jax counterpart), 2 if the fixture cannot be read.
"""
import json
import os
import time

import numpy as np

TOLERANCE = 1e-5


class FixtureTensors:
  """The state dict under `prefix` of a fixture npz, as calm_jax.convert reads checkpoints."""

  def __init__(self, npz, prefix, source):
    self._npz, self._prefix, self._source = npz, prefix, source
    self._keys = [k[len(prefix):] for k in npz.files if k.startswith(prefix)]

  def keys(self):
    return list(self._keys)

  def get(self, key):
    return np.asarray(self._npz[self._prefix + key], np.float32)

  def location(self, key):
    del key
    return f"{self._source}:{self._prefix}*"


def load_fixture(npz_path, json_path=None):
  """(arrays, meta): the npz (lazy) and its json (default: FIXTURE.json beside the npz)."""
  json_path = json_path or os.path.splitext(npz_path)[0] + ".json"
  for path in (npz_path, json_path):
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} does not exist (a fixture is FIXTURE.npz + FIXTURE.json).")
  with open(json_path) as f:
    meta = json.load(f)
  if "config_kwargs" not in meta or not {"autoencoder", "calm"} <= set(meta["config_kwargs"]):
    raise ValueError(f"{json_path} has no config_kwargs.autoencoder / .calm (the reference "
                     "configs): not a reference-CALM fixture.")
  return np.load(npz_path), meta


def convert(arrays, meta, source):
  """The calm_jax configs and params of the fixture's two models (through calm_jax.convert)."""
  import jax  # pylint: disable=g-import-not-at-top
  from calm_jax.convert import hf_config  # pylint: disable=g-import-not-at-top
  from calm_jax.convert import keymap  # pylint: disable=g-import-not-at-top
  from calm_jax.stages import build_model  # pylint: disable=g-import-not-at-top

  kwargs = meta["config_kwargs"]
  ae_config = hf_config.autoencoder_config(kwargs["autoencoder"], source + " autoencoder")
  calm_config = hf_config.calm_config(kwargs["calm"], source + " calm")
  calm_config.model.scan_layers = False       # every layer's output readable
  for config in (ae_config, calm_config):
    config.train.compute_dtype = "float32"    # the fixture is float32
  ae_config.eval.noise_sigmas = ()            # no extra (unrecorded) draws in eval mode
  ae_model = build_model(ae_config)
  calm_model = build_model(calm_config, ae_config.model)

  def shapes(model, length):
    batch = {"tokens": np.zeros((1, length), np.int32), "mask": np.ones((1, length), np.int32)}
    rngs = {n: jax.random.key(0) for n in ("params", "dropout", "sample")}
    abstract = jax.eval_shape(lambda: model.init(rngs, batch))["params"]
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    return keymap.param_shapes(nn.unbox(abstract))

  k = ae_config.model.patch_size
  ae_params = keymap.import_params(
      FixtureTensors(arrays, "params/ae/", source), keymap.autoencoder_rules(ae_config.model),
      shapes(ae_model, k), f"{source} params/ae")
  calm_params = keymap.import_params(
      FixtureTensors(arrays, "params/calm/", source),
      keymap.calm_rules(calm_config.model, ae_config.model), shapes(calm_model, 2 * k),
      f"{source} params/calm")
  return dict(ae_config=ae_config, calm_config=calm_config, ae_model=ae_model,
              calm_model=calm_model, ae_params=ae_params, calm_params=calm_params)


def _capture(mdl, method):
  del mdl, method
  return True


def _first(inter, *path):
  node = inter
  for p in path:
    node = node[p]
  return node[0]


def autoencoder_outputs(parts, arrays):
  """out/ae/*: the encoder and decoder with intermediates, and the full forward (eval, train)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  m, c = parts["ae_model"], parts["ae_config"].model
  variables = {"params": parts["ae_params"]}
  ids_BxL = np.asarray(arrays["in/input_ids"], np.int32)
  b, length = ids_BxL.shape
  k, half_e, half_d = c.patch_size, c.encoder_layers // 2, c.decoder_layers // 2
  out = {}
  (mean, log_std), state = m.apply(variables, ids_BxL.reshape(-1, k), method=m.encode,
                                   capture_intermediates=_capture, mutable=["intermediates"])
  inter = state["intermediates"]["encoder"]
  for i in range(c.encoder_layers):
    out[f"enc_layer{i}_out"] = _first(inter, f"layers_{i}", "__call__")
  out["enc_squeeze_in"] = out[f"enc_layer{half_e - 1}_out"].reshape(b * length // k, 1, -1)
  out["enc_squeeze_out"] = _first(inter, "squeeze", "__call__")
  out["enc_norm_out"] = _first(inter, "norm", "__call__")
  out["latent_mean"], out["latent_log_std"] = mean, log_std
  out["encoder_latent"] = jnp.concatenate([mean, log_std], axis=-1)

  logits, state = m.apply(variables, mean, method=m.decode, capture_intermediates=_capture,
                          mutable=["intermediates"])
  inter = state["intermediates"]["decoder"]
  out["decoder_logits_from_mean"] = logits
  previous = out["dec_latent_to_hidden_out"] = _first(inter, "from_latent", "__call__")
  for i in range(c.decoder_layers):
    if i == half_d:
      out["dec_expand_out"] = _first(inter, "expand", "__call__")
      previous = out["dec_expand_out"].reshape(-1, k, c.hidden)
    out[f"dec_layer{i}_in"] = previous
    previous = out[f"dec_layer{i}_out"] = _first(inter, f"layers_{i}", "__call__")
  out["dec_norm_out"] = _first(inter, "norm", "__call__")

  batch = {"tokens": ids_BxL, "mask": np.ones_like(ids_BxL)}
  n, l = b * length // k, c.latent_dim
  for mode, train in (("eval", False), ("train", True)):
    noise = {"eps": np.asarray(arrays[f"noise/ae/{mode}_eps"], np.float32).reshape(n, l)}
    if train:
      noise["token_u"] = np.asarray(arrays["noise/ae/train_token_u"], np.float32).reshape(n, k)
      noise["latent_keep"] = np.asarray(arrays["noise/ae/train_latent_dropout_keep"]).reshape(n, l)
    (_, metrics), state = m.apply(variables, batch, train=train, noise=noise,
                                  capture_intermediates=_capture, mutable=["intermediates"])
    out[f"forward_{mode}_logits"] = _first(state["intermediates"], "embed", "attend")
    if train:
      out["forward_train_loss"] = metrics["loss"]
      out["forward_train_kl_replicated"] = metrics["kl"]
      out["forward_train_encoder_latent"] = jnp.concatenate(
          _first(state["intermediates"], "encoder", "__call__"), axis=-1)
    else:
      out["forward_eval_loss"] = metrics["recon_loss"]     # the reference's eval loss: CE only
  return {"out/ae/" + name: v for name, v in out.items()}


def _brier_from_latents(parts, variables, z_2xBxPxl, targets_BxPK):
  """Brier-1..4 means of two latent samples per position against the true chunks (K >= 4)."""
  from calm_jax.eval import terms  # pylint: disable=g-import-not-at-top
  m = parts["calm_model"]
  logits = [m.apply(variables, z_2xBxPxl[s], method=m.decode_latent) for s in (0, 1)]
  s1, s2 = (np.argmax(np.asarray(x), axis=-1).astype(np.int32) for x in logits)
  b, p, k = s1.shape
  tokens = np.concatenate([np.zeros((b, k), np.int32), np.asarray(targets_BxPK, np.int32)], 1)
  sums, counts = terms.sampled_chunk_terms(np.stack([s1, s2]), tokens, np.ones_like(tokens))
  return logits, np.asarray(sums) / np.asarray(counts)


def calm_outputs(parts, arrays):
  """out/calm/*, out/calm_train/*, out/brier_direct/*: CALM.__call__ with the saved draws."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from calm_jax.models import layers  # pylint: disable=g-import-not-at-top
  m, c = parts["calm_model"], parts["calm_config"].model
  variables = {"params": {**parts["calm_params"]}}
  ids_BxL = np.asarray(arrays["in/input_ids"], np.int32)
  b, length = ids_BxL.shape
  k = c.patch_size
  t1 = length // k - 1
  batch = {"tokens": ids_BxL, "mask": np.ones_like(ids_BxL)}
  noise = {"u": np.asarray(arrays["noise/calm/head_rand_u"], np.float32) - np.float32(0.5),
           "eps": np.asarray(arrays["noise/calm/energy_target_eps"], np.float32)}
  out = {}
  for prefix, train in (("out/calm/", False), ("out/calm_train/", True)):
    (_, metrics), state = m.apply(variables, batch, train=train, noise=noise,
                                  capture_intermediates=_capture, mutable=["intermediates"])
    inter = state["intermediates"]
    mean, log_std = _first(inter, "autoencoder", "encoder", "__call__")
    o = {"target_mean": mean, "target_log_std": log_std,
         "target_encoder_latent": jnp.concatenate([mean, log_std], -1)[None],
         "loss": metrics["loss"], "energy_score": -_first(inter, "head", "loss")[0]}
    if not train:
      o["compress_in_concat_embeds"] = _first(inter, "embed", "__call__").reshape(b, t1, -1)
      o["compress_pre_layernorm"] = _first(inter, "compress", "project", "__call__")
      o["compress_out"] = _first(inter, "compress", "__call__")
      for i in range(c.layers):
        o[f"backbone_layer{i}_out"] = _first(inter, "transformer", f"layers_{i}", "__call__")[0]
      hidden = o["backbone_last_hidden"] = _first(inter, "transformer", "__call__")
      cos, sin = layers.rope_tables(np.arange(t1), c.hidden // c.heads, c.rope_theta)
      o["rope_cos"] = jnp.concatenate([cos, cos], -1)[None]    # the reference's cat(freqs, freqs)
      o["rope_sin"] = jnp.concatenate([sin, sin], -1)[None]
      s = noise["u"].shape[0]
      o["head_in_hidden_repeated"] = jnp.broadcast_to(hidden.reshape(b * t1, -1),
                                                      (s, b * t1, c.hidden))
      o["head_norm_noise_out"] = _first(inter, "head", "noise_norm", "__call__")
      o["head_norm_hidden_out"] = jnp.broadcast_to(_first(inter, "head", "hidden_norm", "__call__"),
                                                   (s, b * t1, c.hidden))
      for i in range(c.num_head_blocks):
        o[f"head_block{i}_out"] = _first(inter, "head", f"block_{i}", "__call__")
      preds = o["head_latent_predictions"] = _first(inter, "head", "generate")
      if k >= 4:
        z = np.asarray(preds)[:2].reshape(2, b, t1, -1)
        (o["brier_logits_sample0"], o["brier_logits_sample1"]), o["brier"] = _brier_from_latents(
            parts, variables, z, ids_BxL[:, k:])
    out.update({prefix + name: v for name, v in o.items()})
  if k >= 4 and "in/brier_direct/latent_predictions" in arrays.files:
    targets = np.asarray(arrays["in/brier_direct/targets"], np.int32)
    z = np.asarray(arrays["in/brier_direct/latent_predictions"], np.float32)[:2]
    _, out["out/brier_direct/brier"] = _brier_from_latents(
        parts, variables, z.reshape(2, targets.shape[0], -1, z.shape[-1]), targets)
  return out


def compare(arrays, ours, tol):
  """[(name, shape, max_abs, max_rel, passed, note)] for every out/ array of the fixture."""
  rows = []
  for name in sorted(n for n in arrays.files if n.startswith("out/")):
    ref = np.asarray(arrays[name], np.float64)
    if name not in ours:
      rows.append((name, ref.shape, np.nan, np.nan, False, "no calm_jax counterpart"))
      continue
    got = np.asarray(ours[name], np.float64)
    if got.size != ref.size:
      rows.append((name, ref.shape, np.nan, np.nan, False, f"calm_jax shape {got.shape}"))
      continue
    got = got.reshape(ref.shape)
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    rel = err / max(scale, np.finfo(np.float32).tiny)
    ok = bool(np.isfinite(rel) and rel <= tol)
    rows.append((name, ref.shape, err, rel, ok, ""))
  return rows


def format_rows(rows, tol):
  width = max(len(r[0]) for r in rows)
  lines = [f"{'array':<{width}}  {'shape':<15} {'max abs err':>11} {'max rel err':>11}  "
           f"pass@{tol:g}"]
  for name, shape, err, rel, ok, note in rows:
    lines.append(f"{name:<{width}}  {str(list(shape)):<15} {err:11.3e} {rel:11.3e}  "
                 f"{'ok' if ok else 'FAIL'}{'  ' + note if note else ''}")
  return "\n".join(lines)


def run_check(npz_path, json_path=None, tol=TOLERANCE):
  """(rows, seconds): converts, runs and compares one fixture."""
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  arrays, meta = load_fixture(npz_path, json_path)
  source = os.path.basename(npz_path)
  parts = convert(arrays, meta, source)
  # Full float32 matmuls on accelerators too (GPUs default to TF32 passes); the reference ran fp32.
  with jax.default_matmul_precision("highest"):
    ours = {**autoencoder_outputs(parts, arrays), **calm_outputs(parts, arrays)}
  return compare(arrays, ours, tol), time.perf_counter() - start
