r"""Stage 1: the CALM autoencoder (K tokens <-> one l-dim Gaussian latent).

  calm-train --config experiments/autoencoder.py:size=tiny --workdir W1 \
    --config.data.train='jsonl:../shared/data/corpus/train-*.jsonl' \
    --config.data.eval=jsonl:../shared/data/corpus/valid.jsonl

Variants: size=tiny|base, K=<chunk size>, mesh=<a name in common.MESHES>, recipe=default|paper.
  tiny: 2 CPU cores, about 30 minutes; >= 99.5% token accuracy (posterior mean), >= 99%
        with Gaussian noise sigma 0.3 on the latent (robust enough for a head's errors).
  base: the paper's autoencoder (hidden 512, MLP 1280, 2+2 layers, l=128, K=4),
        for an accelerator; >99.9% token accuracy in the paper.
  recipe=paper: the reference's train/train_autoencoder.sh exactly: sizes l.12, optimizer
        l.16-21, 8 x 8 GPUs x 4 = 256 x 2048 tokens l.18, 24, 26, 30k steps l.28, lr 3e-4
        constant l.33-34, bf16 l.41, Llama-3 tokenizer l.5 (experiments/paper.py, line by line).
"""
import ml_collections

from experiments import common
from experiments import paper

SIZES = {
    # tiny: a 512-piece vocabulary (256 byte-fallback pieces + ~250 merges: ~2 characters a
    # token, a 4-token chunk about one word). Measured on the quickstart (2000 AE + 1000 CALM
    # steps): CALM Brier-1 0.055 = 4.8x unigram and BrierLM 0.30 at 512 pieces, 0.027 = 2.8x
    # and BrierLM 0 at 1024: a chunk of 4 larger pieces carries more than a CPU-sized CALM
    # can predict. Small batches with a cosine decay learn fastest per CPU-second.
    # latent_dim 128 (the paper's l): the KL is clipped per dimension, so more dimensions
    # hold more information at a large posterior std. Measured (quickstart corpus, 2000
    # steps): l=32 gives posterior std 0.024 and 72% accuracy at noise sigma 0.3 (a spiky
    # space no head can land in); l=128 gives std 0.22 and 99.97% at sigma 0.3, 99.3% at 0.5.
    # decoder_layers 0 at tiny (the reference's num_decoder_layers=0): the decoder is linear up
    # to its RMSNorm, so the latents that decode a token at a position form a convex set and a
    # point between chunks that share tokens decodes those tokens; latent distances follow
    # shared tokens more closely, and the energy loss rewards each right token, not only a
    # whole right chunk. Measured (corpus, 1500 AE steps, then CALM tiny for 2e13 training
    # FLOPs, benchmarks/RESULTS.md "Issue 11"): 99.97% accuracy, 99.8% at noise sigma 0.5;
    # CALM Brier-1 / Brier-2 0.026 / 0.00074 with a 2-layer decoder, 0.032 / 0.0010 with 0
    # (0.034 / 0.0020 with a linear encoder too, 0.042 / 0.0026 with calm.py's tiny beta and N).
    "tiny": dict(hidden=128, mlp=320, latent_dim=128, vocab_size=512, seq_len=256,
                 batch_size=16, steps=1500, lr=3e-3, warmup=50, schedule="cosine",
                 encoder_layers=2, decoder_layers=0),
    "base": dict(hidden=512, mlp=1280, latent_dim=128, vocab_size=32768, seq_len=2048,
                 batch_size=64, steps=30000, lr=3e-4, warmup=1000, schedule="constant",
                 encoder_layers=2, decoder_layers=2),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, size="tiny", K=4, mesh="local", recipe="default")
  s = SIZES[arg.size]
  config = common.run_config("autoencoder", arg.mesh, s)
  config.data.packing = "chunk_aligned"     # no chunk crosses a document (the paper's setup)
  config.optim.warmup_steps = s["warmup"]
  config.optim.schedule = s["schedule"]
  config.optim.min_lr_ratio = 0.05
  config.model = ml_collections.ConfigDict(dict(
      vocab_size=s["vocab_size"],
      patch_size=arg.K,                     # K: tokens per latent vector
      hidden=s["hidden"],
      mlp=s["mlp"],
      encoder_layers=s["encoder_layers"],   # first half per token, second half per chunk
      decoder_layers=s["decoder_layers"],   # 0: linear (convex token regions)
      latent_dim=s["latent_dim"],           # l
      kl_clip=0.5,                          # per-dimension KL is clipped from below at this
      kl_weight=1e-3,
      latent_dropout=0.15,                  # dropout on the sampled z during training
      token_mask_rate=0.15,                 # input tokens replaced by mask_id during training
      mask_id=0,
      norm_eps=1e-6,
      init_std=0.02,
      # The reference's Encoder rounds its token embeddings to bfloat16 whenever it is in
      # training mode (modeling_autoencoder.py, Encoder.forward); recipe=paper does the same.
      encoder_bf16_embeddings_in_training=False,
  ))
  return paper.apply(arg.recipe, paper.autoencoder, config)
