r"""Stage 2: CALM, a Transformer that predicts the next chunk's latent vector.

  calm-train --config experiments/calm.py:size=tiny --workdir W2 \
    --config.autoencoder.workdir=W1 \
    --config.data.train='jsonl:../shared/data/corpus/train-*.jsonl' \
    --config.data.eval=jsonl:../shared/data/corpus/valid.jsonl

Variants: size=tiny|M|L|XL, head=energy|flow|diffusion, K=<chunk size>, mesh=<common.MESHES>,
recipe=default|paper.
  tiny: 2 CPU cores, minutes; needs a finished tiny autoencoder run (W1).
  M/L/XL: the paper's CALM-M/L/XL (M: 1024 hidden, MLP 2752, 16 layers, 4 head
  blocks), for accelerators. K must equal the autoencoder's K.
  recipe=paper (size=M|L|XL): the reference's train/train_energy.sh exactly: sizes l.23,
  optimizer l.25-30, 4 x 8 GPUs x 8 = 256 x 8192 tokens l.27, 33, 35, 250k steps l.37, lr 3e-4
  constant l.42-43, bf16 l.50 (experiments/paper.py, line by line).
"""
import ml_collections

from experiments import common
from experiments import paper

SIZES = {
    # tiny: 16 x 256 tokens a step (1,008 target chunks), the AR baseline's batch. At 4e13
    # FLOPs (twice the steps of 32 x 256) BrierLM 0.494 vs 0.394 (with beta 0.25: 0.654 / 0.671
    # over seeds 0 / 1 vs 0.560 / 0.544); with the old recipe's 16 x 64 the head's signal was
    # too small to leave the marginal.
    # Targets at tiny: the posterior mean (target_std_scale 0, one target per position), not
    # the reference's 100 posterior samples. The tiny autoencoder's posterior noise (std ~0.32
    # per dim, ~5 in norm) is a third of the distance between chunks (~16): as a target it adds
    # variance to every gradient and asks the head for the data blurred by it, which the
    # decoder does not need (99.8% accuracy at noise sigma 0.5); one target instead of 100,
    # and N = 4 head samples instead of the reference's 8, leave FLOPs for more steps.
    # Measured at 2e13 training FLOPs on the corpus with the linear-decoder tiny autoencoder
    # (benchmarks/RESULTS.md "Issue 11"; batch 32), Brier-1 / Brier-2 / Brier-4 / BrierLM:
    #   100 posterior samples, beta 1, N 8     0.032 / 0.0010 / 0       / 0
    #   100 posterior samples, beta 0.5, N 4   0.042 / 0.0026 / 0.00001 / 0.060
    #   posterior mean, beta 0.5, N 4          0.056 / 0.0044 / 0.00014 / 0.236
    #   posterior mean, beta 1, N 4            0.055 / 0.0045 / 0.00017 / 0.260
    #   posterior mean, beta 0.25, N 4         0.060 / 0.0041 / 0.00027 / 0.293
    #   AR tiny, same FLOPs                    0.110 / 0.0135 / 0.00011 / 0.446
    # The energy exponent anneals from 1 to 0.25 over the first 1000 steps. A constant 0.25
    # scores best at 4e13 FLOPs (BrierLM 0.654 / 0.671 over two seeds, batch 16) but hardly
    # moves a far-off head sample: on the synthetic successor corpus (tests/test_calm_learns.py)
    # with successor table 11 it stalls at Brier-1 0.73 after 1000 steps, and so does an anneal
    # over 500 steps (0.75); beta 1 reaches 0.99 by 800. The 1000-step anneal reaches Brier-1
    # >= 0.996 on tables 5, 7, 11, 13 and 17, and BrierLM 0.570 at 4e13 (beta 1: 0.494); at
    # K=2 (latent 64, its own autoencoder) 0.772, 47% of the AR baseline's 1.636 (constant
    # beta 1 at K=2: 0.766; the quickstart keeps beta 1, see calm_jax/cli/quickstart.py).
    # Evaluation reads a moving average of the params (train.ema_decay 0.99, about the last 100
    # steps): at batch 16 the last step's weights carry its updates' noise. At K=2, 4e13 FLOPs,
    # training seeds 0 / 1: BrierLM 0.772 / 0.603 without, 0.881 / 0.818 with (AR 1.636);
    # a head half as wide (head_hidden 64, 39% more steps) 0.721, 512-token blocks 0.748.
    # M/L/XL keep the reference's plain params.
    "tiny": dict(vocab_size=512, latent_dim=128, seq_len=256, batch_size=16, steps=2000, lr=1e-3,
                 beta=0.25, beta_start=1.0, beta_anneal_steps=1000, samples=4,
                 target_std_scale=0.0, target_samples=1, head_hidden=0, ema_decay=0.99),
    "M": dict(vocab_size=32768, latent_dim=128, seq_len=2048, batch_size=256, steps=250_000,
              lr=3e-4, beta=1.0, beta_start=1.0, beta_anneal_steps=0, samples=8,
              target_std_scale=1.0, target_samples=100, head_hidden=0, ema_decay=0.0),
    "L": dict(vocab_size=32768, latent_dim=128, seq_len=2048, batch_size=256, steps=250_000,
              lr=3e-4, beta=1.0, beta_start=1.0, beta_anneal_steps=0, samples=8,
              target_std_scale=1.0, target_samples=100, head_hidden=0, ema_decay=0.0),
    "XL": dict(vocab_size=32768, latent_dim=128, seq_len=2048, batch_size=256, steps=250_000,
               lr=3e-4, beta=1.0, beta_start=1.0, beta_anneal_steps=0, samples=8,
               target_std_scale=1.0, target_samples=100, head_hidden=0, ema_decay=0.0),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, size="tiny", head="energy", K=4, mesh="local", recipe="default")
  s = SIZES[arg.size]
  config = common.run_config("calm", arg.mesh, s)
  config.train.ema_decay = s["ema_decay"]   # > 0: eval, sampling and export read the params' EMA
  config.eval.block_len = 4 * s["seq_len"] if arg.size != "tiny" else s["seq_len"]

  config.autoencoder = ml_collections.ConfigDict(dict(
      workdir="",                           # a finished stage-1 run (required)
      step=-1,                              # -1: its latest checkpoint at this run's first
                                            # start (then recorded in config.json)
      digest="",                            # sha256 of its params (checkpoint.params_digest):
                                            # recorded at the first start, checked after
      tokenizer_digest="",                  # sha256 of its tokenizer (tokenizer.digest): the
                                            # same
  ))

  model = common.backbone_config(arg.size, s["vocab_size"], patch_size=arg.K)
  model.latent_dim = s["latent_dim"]        # must equal the autoencoder's l
  model.head = arg.head                     # 'energy' | 'flow' | 'diffusion'
  model.num_head_blocks = max(1, model.layers // 4)
  model.head_hidden = s["head_hidden"]      # the head's width D (0: the backbone's hidden, as
                                            # the reference ties them)
  model.noise_dim = 64                      # energy head: u ~ U[-0.5, 0.5]^noise_dim
  model.num_model_samples = s["samples"]    # N head samples per position (energy loss)
  model.num_target_samples = s["target_samples"]  # M targets per position (energy loss)
  model.target_std_scale = s["target_std_scale"]  # targets: AE posterior samples with the std
                                            # times this (1: the reference; 0: the posterior mean)
  model.beta = s["beta"]                    # energy score exponent, in (0, 2)
  model.beta_start = s["beta_start"]        # the exponent at step 0, linearly to beta over
  model.beta_anneal_steps = s["beta_anneal_steps"]  # these steps (0: beta throughout)
  model.flow_steps = 4                      # flow head: midpoint ODE steps at sampling
  model.diffusion_train_steps = 1000        # diffusion head: noise schedule length
  model.diffusion_sample_steps = 100        # diffusion head: DDIM-style steps at sampling
  model.head_batch_mul = 4                  # flow/diffusion: noise draws per position in training
  model.layer_norm_eps = 1e-6               # the LayerNorms of compress and heads (reference: 1e-6)
  model.logits_chunk = 128                  # eval: positions whose head samples are decoded (float32
                                            # [B, C, K, V] logits) and continued at once; 0: all
  # Training targets from bfloat16-rounded embeddings, as the reference's frozen encoder
  # computes them in training mode (recipe=paper does the same).
  model.targets_bf16_embeddings_in_training = False
  config.model = model
  if arg.recipe == "paper" and (arg.size not in ("M", "L", "XL") or arg.head != "energy"):
    raise ValueError(f"calm.py: recipe=paper is train_energy.sh: use size=M|L|XL with the energy "
                     f"head (got size={arg.size}, head={arg.head}).")
  return paper.apply(arg.recipe, paper.calm, config)
