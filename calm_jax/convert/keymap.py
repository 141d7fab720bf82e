"""The reference's state-dict keys <-> calm_jax param paths: one Rule per tensor, both directions.

Layouts (the reference is PyTorch): nn.Linear.weight is [out, in] and y = x W^T + b, so a
calm_jax kernel [*in, *out] is W^T reshaped: q/k/v_proj [H*hd, D] -> [D, H, hd] and o_proj
[D, H*hd] -> [H, hd, D] (head-major, as the reference's .view(B, L, H, hd)). Embeddings,
norm weights and biases copy as they are. With model.scan_layers the backbone's
layers are stacked on a leading axis (Rule.layer says where each goes).

Aliases: the reference's state dicts hold some tensors twice: decoder.lm_head_weight is
encoder.embed_tokens.weight (the tied decoder), generative_head.* is mlp_generator.*
(one module under two names). Import reads one and requires the copies to be
bit-identical; export writes every key the reference's state_dict() has. The CALM
state dict also holds its frozen autoencoder under ae_model.*.

Import and export go one tensor at a time: the caller's arrays are filled in place
(stacked layers preallocated), never a second full copy of the model.
"""
import collections.abc
import dataclasses
import math
import re

import numpy as np

from calm_jax import progress
from calm_jax.convert import ConvertError

# Non-persistent buffers that older transformers versions saved; recomputed from rope_theta.
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class Rule:
  key: str                   # the reference's state-dict key
  path: tuple                # calm_jax params path
  n_in: int | None = None    # Linear weight: kernel input dims (kernel = W^T reshaped); None: copy
  layer: int | None = None   # index on a stacked (scan_layers) leading axis
  aliases: tuple = ()        # other keys of the same tensor in the reference's state dict


def _linear(key, path, bias=True, n_in=1, layer=None):
  rules = [Rule(key + ".weight", path + ("kernel",), n_in=n_in, layer=layer)]
  if bias:
    rules.append(Rule(key + ".bias", path + ("bias",), layer=layer))
  return rules


def _layer_norm(key, path):
  return [Rule(key + ".weight", path + ("scale",)), Rule(key + ".bias", path + ("bias",))]


def _swiglu(key, path, layer=None):
  return [r for name, ours in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"))
          for r in _linear(f"{key}.{name}", path + (ours,), bias=False, layer=layer)]


def autoencoder_rules(model_config, key_prefix="", path=()):
  """The Autoencoder's state dict (prefix 'ae_model.' inside a CALM) <-> calm_jax params."""
  m, p, e, d = model_config, key_prefix, path + ("encoder",), path + ("decoder",)
  rules = [Rule(p + "encoder.embed_tokens.weight", path + ("embed", "embedding"),
                aliases=(p + "decoder.lm_head_weight",))]
  for i in range(m.encoder_layers):
    key = f"{p}encoder.encoder_layers.{i}"
    rules += _swiglu(key + ".mlp", e + (f"layers_{i}", "mlp"))
    rules.append(Rule(key + ".layernorm.weight", e + (f"layers_{i}", "norm", "scale")))
  rules += _linear(p + "encoder.hidden_to_latent", e + ("to_latent",))
  rules += _linear(p + "encoder.squeeze_layer", e + ("squeeze",))
  rules.append(Rule(p + "encoder.norm.weight", e + ("norm", "scale")))
  rules += _linear(p + "decoder.latent_to_hidden", d + ("from_latent",))
  for i in range(m.decoder_layers):
    key = f"{p}decoder.decoder_layers.{i}"
    rules += _swiglu(key + ".mlp", d + (f"layers_{i}", "mlp"))
    rules.append(Rule(key + ".layernorm.weight", d + (f"layers_{i}", "norm", "scale")))
  rules += _linear(p + "decoder.expand_layer", d + ("expand",))
  rules.append(Rule(p + "decoder.norm.weight", d + ("norm", "scale")))
  return rules


def _backbone_rules(m):
  rules = [Rule("transformer.embed_tokens.weight", ("embed", "embedding"))]
  for i in range(m.layers):
    key = f"transformer.layers.{i}"
    path, layer = (("transformer", "layers"), i) if m.scan_layers else (
        ("transformer", f"layers_{i}"), None)
    for name, ours, n_in in (("q_proj", "query", 1), ("k_proj", "key", 1), ("v_proj", "value", 1),
                             ("o_proj", "out", 2)):
      rules += _linear(f"{key}.self_attn.{name}", path + ("attn", ours), bias=False, n_in=n_in,
                       layer=layer)
    rules += _swiglu(key + ".mlp", path + ("mlp",), layer=layer)
    rules.append(Rule(key + ".input_layernorm.weight", path + ("attn_norm", "scale"), layer=layer))
    rules.append(Rule(key + ".post_attention_layernorm.weight", path + ("mlp_norm", "scale"),
                      layer=layer))
  rules.append(Rule("transformer.norm.weight", ("transformer", "final_norm", "scale")))
  return rules


def _energy_head_rules(m):
  head = ("head",)
  rules = _linear("mlp_generator.noise_embd", head + ("noise_embed",))
  rules += _linear("mlp_generator.hidden_embd", head + ("hidden_embed",))
  rules += _layer_norm("mlp_generator.norm_hidden", head + ("hidden_norm",))
  rules += _layer_norm("mlp_generator.norm_noise", head + ("noise_norm",))
  for i in range(m.num_head_blocks):
    key, path = f"mlp_generator.mlp_blocks.{i}", head + (f"block_{i}",)
    rules += _layer_norm(key + ".in_ln", path + ("norm",))
    for index, ours in ((0, "fuse"), (2, "hidden"), (4, "gate_up")):
      rules += _linear(f"{key}.linears.{index}", path + (ours,))
    rules += _linear(key + ".down_proj", path + ("down",))
  rules += _layer_norm("mlp_generator.final_layer.in_ln", head + ("final_norm",))
  rules += _linear("mlp_generator.final_layer.linears.0", head + ("final_hidden",))
  rules += _linear("mlp_generator.final_layer.linears.2", head + ("final_out",))
  # generative_head is the same module as mlp_generator: every key is stored under both names.
  return [dataclasses.replace(r, aliases=(r.key.replace("mlp_generator.", "generative_head.", 1),))
          for r in rules]


def calm_rules(model_config, ae_model_config=None):
  """EnergyTransformer's state dict <-> calm_jax CALM params (and ae_model.* if given)."""
  m = model_config
  rules = _backbone_rules(m) + _energy_head_rules(m)
  rules += _linear("embed_proj.0", ("compress", "expand"))
  rules += _linear("embed_proj.2", ("compress", "project"))
  rules += _layer_norm("embed_proj.3", ("compress", "norm"))
  if ae_model_config is None:
    return rules
  return rules + autoencoder_rules(ae_model_config, "ae_model.", ("autoencoder",))


# -- Tensors --------------------------------------------------------------------------------
def _kernel_shapes(rule, shape):
  """(the reference's shape, calm_jax's per-layer shape) of a rule's tensor."""
  if rule.layer is not None:
    shape = shape[1:]
  if rule.n_in is None:
    return tuple(shape), tuple(shape)
  ins, outs = shape[:rule.n_in], shape[rule.n_in:]
  return (math.prod(outs), math.prod(ins)), tuple(shape)


def to_calm_jax(rule, tensor, shape):
  """The reference's tensor -> calm_jax's layout for a param of (stacked) `shape`."""
  want, ours = _kernel_shapes(rule, shape)
  if tuple(tensor.shape) != want:
    raise ConvertError(f"{rule.key} has shape {list(tensor.shape)}, but the sizes in config.json "
                       f"need {list(want)} (calm_jax param {'/'.join(rule.path)} {list(shape)}).")
  if rule.n_in is None:
    return tensor
  return np.asarray(tensor).T.reshape(ours)


def to_reference(rule, param):
  """A calm_jax param (one layer's slice if stacked) -> the reference's tensor."""
  if rule.n_in is None:
    return param
  ins = math.prod(param.shape[:rule.n_in])
  return np.asarray(param).reshape(ins, -1).T


def _flat(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, collections.abc.Mapping):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _nest(flat):
  tree = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


def _check_rules_cover(rules, shapes, what):
  covered = {r.path for r in rules}
  missing = sorted("/".join(p) for p in set(shapes) - covered)
  extra = sorted("/".join(p) for p in covered - set(shapes))
  if missing or extra:
    raise AssertionError(f"keymap for {what} is out of date with the model: params without a "
                         f"rule {missing[:5]}, rules without a param {extra[:5]}.")


def import_params(tensors, rules, shapes, what):
  """calm_jax params (nested dict of float32 numpy) from a checkpoint's tensors.

  tensors: keys(), get(key) -> float32 array, location(key) (hf_files.CheckpointTensors or a
  mapping adapter). shapes: {path tuple: shape} of the model's params (jax.eval_shape of its
  init). Unknown and missing keys, unequal aliases and shape mismatches raise ConvertError.
  """
  _check_rules_cover(rules, shapes, what)
  present = set(tensors.keys())
  known = {k for r in rules for k in (r.key,) + r.aliases}
  unknown = sorted(k for k in present - known if not IGNORED.match(k))
  if unknown:
    raise ConvertError(f"{what}: {len(unknown)} key(s) with no calm_jax counterpart, e.g. "
                       f"{unknown[:5]} (in {tensors.location(unknown[0])}); is this a reference "
                       "Autoencoder / EnergyTransformer checkpoint with the sizes of its "
                       "config.json?")
  flat = {}
  for path, shape in shapes.items():
    if any(r.path == path and r.layer is not None for r in rules):
      flat[path] = np.empty(shape, np.float32)
  for rule in progress.bar(rules, desc=f"convert {what}", unit="tensor"):
    names = [k for k in (rule.key,) + rule.aliases if k in present]
    if not names:
      raise ConvertError(f"{what}: key {rule.key!r} is missing from the checkpoint (needed for "
                         f"calm_jax param {'/'.join(rule.path)}).")
    tensor = tensors.get(names[0])
    for other in names[1:]:
      if not np.array_equal(tensors.get(other), tensor):
        raise ConvertError(f"{what}: {other!r} differs from {names[0]!r}, but the reference "
                           "model holds one tensor under both names; the checkpoint is "
                           "inconsistent.")
    value = to_calm_jax(rule, tensor, shapes[rule.path])
    if rule.layer is None:
      flat[rule.path] = np.array(value, np.float32)        # own the memory (not the mmap)
    else:
      flat[rule.path][rule.layer] = value
    del tensor, value
  return _nest(flat)


def export_specs(rules, shapes):
  """(key, shape, float32) of every tensor export_tensors yields, in the same order."""
  specs = []
  for rule in rules:
    want, _ = _kernel_shapes(rule, shapes[rule.path])
    specs += [(k, want, np.float32) for k in (rule.key,) + rule.aliases]
  return specs


def export_tensors(params, rules):
  """Yields the reference's tensors (float32, aliases included) one at a time, in rule order."""
  flat = _flat(params)
  for rule in progress.bar(rules, desc="export", unit="tensor"):
    param = np.asarray(flat[rule.path], np.float32)
    tensor = to_reference(rule, param if rule.layer is None else param[rule.layer])
    for _ in (rule.key,) + rule.aliases:
      yield tensor


def param_shapes(abstract_params):
  """{path: shape} of an (unboxed) abstract param tree."""
  return {path: tuple(leaf.shape) for path, leaf in _flat(abstract_params).items()}
