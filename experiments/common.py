"""Config sections shared by every experiment: data, train, optim, mesh, checkpoint, eval.

Each experiment file calls these and then sets its own model section; every
default the library reads lives here or in the experiment file, nowhere else.
"""
import ml_collections

# Logical axis name -> mesh axes. Params use the plain names; activations use
# `batch`, `length` and the `act_*` names so that a weight dim sharded over
# `fsdp` never collides with the batch dim, which is also sharded over `fsdp`.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("latent", None),
    ("noise", None),
    ("layers", None),
)

# The paper's backbone sizes (hidden, MLP, layers, heads); head blocks = layers / 4.
# init_std: the std of every linear/embedding weight at init. The reference's 0.02 (HF
# initializer_range) is about 1/sqrt(width) at its widths; at width 128 it leaves each
# residual MLP block of the energy head ~1e-4 of its input, so the head ignores the
# backbone for hundreds of steps (measured: Brier-1 0.0067 at 0.02 vs 0.0235 at 0.088,
# unigram 0.0096). tiny therefore uses 1/sqrt(128) = 0.088.
BACKBONES = {
    "tiny": dict(hidden=128, mlp=384, layers=2, heads=4, init_std=0.088),
    "S": dict(hidden=768, mlp=2048, layers=12, heads=16, init_std=0.02),
    "M": dict(hidden=1024, mlp=2752, layers=16, heads=16, init_std=0.02),
    "L": dict(hidden=1536, mlp=4096, layers=16, heads=16, init_std=0.02),
    "XL": dict(hidden=2560, mlp=6880, layers=16, heads=32, init_std=0.02),
}


# Named mesh shapes for the `mesh=` variant of every experiment: (data, fsdp, tensor,
# dcn_data). data x fsdp x tensor x dcn_data must equal the device count; -1 = the rest.
MESHES = {
    "local": dict(data=-1, fsdp=1, tensor=1, dcn_data=1),     # pure data parallel
    "fsdp": dict(data=1, fsdp=-1, tensor=1, dcn_data=1),      # one host, params sharded
    "h100x8": dict(data=1, fsdp=8, tensor=1, dcn_data=1),     # one 8-GPU node
    "h100x32": dict(data=4, fsdp=8, tensor=1, dcn_data=1),    # 4 nodes x 8 GPUs (SLURM)
    "v5p-64": dict(data=4, fsdp=8, tensor=1, dcn_data=1),     # 32 chips, one slice
    "v5p-128": dict(data=4, fsdp=16, tensor=1, dcn_data=1),   # 64 chips, one slice
    "2xv5p-64": dict(data=4, fsdp=8, tensor=1, dcn_data=2),   # two slices over DCN (xpk)
    "v5p-64-tp": dict(data=2, fsdp=8, tensor=2, dcn_data=1),  # XL with tensor parallelism
}


def apply_mesh(config, name):
  """Sets config.mesh.{data,fsdp,tensor,dcn_data} from a MESHES entry."""
  if name not in MESHES:
    raise ValueError(f"Unknown mesh={name!r}; known meshes: {sorted(MESHES)}")
  for field, value in MESHES[name].items():
    config.mesh[field] = value


def parse_arg(arg, **defaults):
  """Parses a big_vision style variant string 'size=M,head=flow,runlocal'."""
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in values:
      raise ValueError(
          f"Unknown config variant {key!r}; known variants: {sorted(values)}")
    default = values[key]
    if isinstance(default, bool):
      values[key] = value in ("", "1", "true", "True")
    elif isinstance(default, int):
      values[key] = int(value)
    else:
      values[key] = value
  return ml_collections.ConfigDict(values)


def data_config():
  return ml_collections.ConfigDict(dict(
      train="builtin:python_docs",      # data SPEC (see README); ',' mixes several
      eval="builtin:python_docs:valid",
      tokenizer="",                     # .model, tokenizer.json or a dir with one; '' trains
                                        # a SentencePiece model into the workdir
      tokenizer_type="bpe",             # 'bpe' | 'unigram'
      vocab_size=4096,
      seq_len=256,                      # tokens per example; a multiple of model.patch_size
      packing="concat",                 # 'concat' | 'chunk_aligned'
      document_eos=True,                # append EOS to every document (the reference's CALM
                                        # and AR scripts do not: recipe=paper sets False)
      pad_in_loss=False,                # chunk_aligned padding carries loss (mask 1), as in the
                                        # reference autoencoder's group_texts (recipe=paper)
      max_bad_fraction=0.001,           # bad lines (invalid JSON, missing field, not UTF-8) are
                                        # skipped and counted; more than this fraction fails
      worker_count=0,                   # grain worker processes (0: in-process)
      prefetch=2,                       # batches prefetched per process
      tokenizer_max_chars=5_000_000,    # characters sampled to train a tokenizer
  ))


def train_config():
  return ml_collections.ConfigDict(dict(
      batch_size=16,                    # global, across all processes
      steps=1000,
      seed=0,
      log_every=20,
      eval_every=200,                   # 0 disables periodic eval
      eval_batches=8,                   # batches per periodic eval
      grad_accum_steps=1,
      ema_decay=0.0,                    # > 0: evaluate, sample and export a moving average of
                                        # the params (decay per step; 0: the params themselves)
      compute_dtype="float32",          # 'float32' | 'bfloat16' (params stay fp32)
      nan_policy="halt",                # 'halt' | 'skip' on non-finite loss/grads
      allow_config_change=False,        # resume a workdir with a different config
      profile_steps=(0, 0),             # (start, stop): jax.profiler trace of those steps in
                                        # WORKDIR/profile (TensorBoard profile plugin); (0, 0): none
  ))


def optim_config():
  return ml_collections.ConfigDict(dict(
      lr=3e-4,
      warmup_steps=100,
      schedule="constant",              # 'constant' | 'cosine'
      min_lr_ratio=0.1,                 # cosine floor, as a fraction of lr
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      clip=1.0,
  ))


def mesh_config():
  return ml_collections.ConfigDict(dict(
      data=-1,                          # -1: all devices not used by other axes
      fsdp=1,
      tensor=1,
      dcn_data=1,                       # data-parallel replicas across slices (multi-slice TPU)
      rules=DEFAULT_RULES,
  ))


def checkpoint_config():
  return ml_collections.ConfigDict(dict(
      every_steps=500,
      keep=3,
      async_save=True,
  ))


def eval_config():
  return ml_collections.ConfigDict(dict(
      block_len=512,                    # tokens per evaluation block (paper: 8192 CALM, 2048 AR)
      batch_size=8,
      max_tokens=100_000,               # cap on evaluated tokens (0: no cap)
      noise_sigmas=(0.3, 0.5),          # autoencoder accuracy under Gaussian noise on z
      brier_samples=2,                  # CALM: head samples per position for Brier-n (2: the
                                        # paper's estimator; more: same mean, less variance)
      unigram_tokens=1_000_000,         # training tokens counted for the unigram baseline's Brier-n
  ))


def log_config():
  """Where metrics go besides WORKDIR/metrics.jsonl and WORKDIR/tensorboard."""
  return ml_collections.ConfigDict(dict(
      wandb_project="",                 # Weights & Biases project ('': off; pip install -e
                                        # '.[wandb]'; WANDB_MODE=offline writes WORKDIR/wandb)
  ))


def sampling_config():
  """calm-generate (and the quickstart's sample): temperature sampling for CALM and the AR baseline."""
  return ml_collections.ConfigDict(dict(
      temperature=0.5,                  # T in (0, 1] for CALM (likelihood-free); AR: any T > 0.
                                        # 0.5: the reference's generate() default
      max_tokens=64,                    # new tokens per continuation (stops earlier at EOS)
      num_samples=4,                    # continuations per prompt (the generation batch)
      method="auto",                    # CALM: 'exact' (any T) | 'batch_approx' (T = 1/n only,
                                        # the reference's temperature_sampling) | 'auto'
                                        # (batch_approx when 1/T is an integer, else exact)
      max_draws=2048,                   # exact: cap on head draws per chunk, then the approximation
      draws_per_step=16,                # exact: head draws per while-loop iteration
      fallback_pool=256,                # exact: draws kept for the fallback approximation
      batch_approx_samples=200,         # batch_approx: pool size S (the reference uses 200)
      top_k=0,                          # AR baseline: sample among the k most likely (0: all)
  ))


def base_config(stage):
  config = ml_collections.ConfigDict()
  config.stage = stage                  # 'autoencoder' | 'calm' | 'ar'
  config.init_from = ""                 # WORKDIR[:STEP]: start from that run's (or a converted
                                        # checkpoint's) params; fresh optimizer state
  config.data = data_config()
  config.train = train_config()
  config.optim = optim_config()
  config.mesh = mesh_config()
  config.checkpoint = checkpoint_config()
  config.eval = eval_config()
  config.sampling = sampling_config()
  config.log = log_config()
  return config


def run_config(stage, mesh, size):
  """base_config(stage) with a named mesh and a SIZES row's data/batch/steps/lr applied."""
  config = base_config(stage)
  apply_mesh(config, mesh)
  config.data.vocab_size = size["vocab_size"]
  config.data.seq_len = size["seq_len"]
  config.train.batch_size = size["batch_size"]
  config.train.steps = size["steps"]
  config.optim.lr = size["lr"]
  return config


def backbone_config(size, vocab_size, patch_size):
  """The Llama-style Transformer fields shared by the CALM and AR models."""
  b = BACKBONES[size]
  return ml_collections.ConfigDict(dict(
      vocab_size=vocab_size,
      patch_size=patch_size,
      hidden=b["hidden"],
      mlp=b["mlp"],
      layers=b["layers"],
      heads=b["heads"],
      kv_heads=b["heads"],              # < heads for GQA
      rope_theta=10000.0,
      norm_eps=1e-6,
      init_std=b["init_std"],
      remat="none",                     # 'none' | 'full' | 'dots'
      scan_layers=True,
  ))
