r"""recipe=paper: the reference's training scripts (github.com/shaochenze/calm at c556310) as configs.

Each experiment file applies one of these after building its own config:
  autoencoder.py:recipe=paper          train/train_autoencoder.sh
  calm.py:size=M|L|XL,recipe=paper     train/train_energy.sh (M as written; L/XL change the
                                       backbone sizes only, as for the released CALM-L/XL)
  ar_baseline.py:size=S|M|L,recipe=paper  train/train_ar.sh (S as written: 768 hidden,
                                       12 layers, 16 heads; M/L change the sizes only)
Line numbers below are those of the scripts.

What the scripts set, and calm_jax's equivalent:
  --per_device_train_batch_size x 8 GPUs x --gradient_accumulation_steps
                                 -> train.batch_size (global), train.grad_accum_steps
  --block_size                   -> data.seq_len (and eval.block_len: HF evaluates on the same
                                    blocks)
  --learning_rate 3e-4, --lr_scheduler_type constant, --warmup_steps N
                                 -> optim.lr, optim.schedule='constant', optim.warmup_steps=0:
                                    transformers' get_scheduler('constant') returns a constant
                                    schedule and ignores num_warmup_steps (only
                                    'constant_with_warmup' warms up), so the scripts train at
                                    3e-4 from step 0. Pass --config.optim.warmup_steps=N for
                                    the warm-up the flag names.
  --adam_beta1/2, --weight_decay, --max_grad_norm, AdamW eps 1e-8 (HF default)
                                 -> optim.b1/b2/weight_decay/clip/eps; the Trainer decays all
                                    weights but biases and norm scales, as calm_jax does
  --bf16 True                    -> train.compute_dtype='bfloat16' (fp32 master weights)
  --seed 1, --eval_steps, --save_steps, --logging_steps
                                 -> train.seed, train.eval_every, checkpoint.every_steps,
                                    train.log_every
  --tokenizer_name llama3_tokenizer
                                 -> data.tokenizer='llama3_tokenizer' (a directory with
                                    tokenizer.json; the scripts add a [PAD] token, so the
                                    vocabulary is 128,256 + 1 = 128,257)
Data as the scripts' group_texts builds it: the Llama-3 tokenizer puts <|begin_of_text|> before
every document; the autoencoder appends EOS and pads each document to a multiple of K with
[PAD] that is trained on (labels = input_ids); CALM and AR concatenate the tokenized documents
with no EOS. The reference's encoder rounds its token embeddings to bfloat16 in training mode
(also as CALM's frozen target encoder): the *_bf16_embeddings_in_training fields.
"""
LLAMA3_VOCAB = 128_257          # Llama-3's 128,256 tokens + the [PAD] the scripts add
TOKENIZER = "llama3_tokenizer"  # the reference repository's llama3_tokenizer/ directory
_PILE = "jsonl:pile-uncopyrighted/train/"
WIKITEXT = "jsonl:data/wikitext_document_level-test.json"   # --validation_file
GPUS = 8                        # torchrun --nproc_per_node 8


def _training(config, *, per_device, accum, block, steps, save_steps):
  """The Trainer flags every script shares (lines named in the callers' docstrings)."""
  config.train.batch_size = GPUS * per_device * accum
  config.train.grad_accum_steps = accum
  config.train.steps = steps
  config.train.seed = 1
  config.train.compute_dtype = "bfloat16"
  config.train.log_every = 100
  config.train.eval_every = 1000
  config.train.eval_batches = 0                 # the whole validation file
  config.checkpoint.every_steps = save_steps
  config.optim.update(lr=3e-4, schedule="constant", warmup_steps=0, b1=0.9, b2=0.95, eps=1e-8,
                      weight_decay=0.1, clip=1.0)
  config.data.tokenizer = TOKENIZER
  config.data.vocab_size = LLAMA3_VOCAB
  config.data.seq_len = block
  config.data.eval = WIKITEXT
  config.eval.block_len = block
  config.eval.batch_size = GPUS                 # --per_device_eval_batch_size 1
  config.eval.max_tokens = 0


def autoencoder(config):
  """train/train_autoencoder.sh: --config_overrides latent 128, 2+2 layers, K=4 (l.12), weight
  decay 0.1 (l.16), --warmup_steps 1000 (l.17, ignored by the constant schedule), block 2048
  (l.18), betas 0.9/0.95 (l.19-20), clip 1.0 (l.21), seed 1 (l.23), 8 per device x 4 accumulation
  = 256 x 2048 tokens (l.24, 26), 30k steps (l.28), saves every 10k (l.30), eval every 1000
  (l.32), lr 3e-4 constant (l.33-34), bf16 (l.41); files 00-01 of the Pile (l.6). Model:
  AutoencoderConfig's defaults (hidden 512, MLP 1280, KL clip 0.5, weight 1e-3, dropout 0.15)."""
  _training(config, per_device=8, accum=4, block=2048, steps=30_000, save_steps=10_000)
  config.data.train = _PILE + "0[01].text.jsonl"
  config.data.packing = "chunk_aligned"
  config.data.document_eos = True
  config.data.pad_in_loss = True
  config.model.update(vocab_size=LLAMA3_VOCAB, patch_size=4, hidden=512, mlp=1280,
                      encoder_layers=2, decoder_layers=2, latent_dim=128, kl_clip=0.5,
                      kl_weight=1e-3, latent_dropout=0.15, token_mask_rate=0.15, mask_id=0,
                      norm_eps=1e-6, init_std=0.02, encoder_bf16_embeddings_in_training=True)


def calm(config):
  """train/train_energy.sh: --config_overrides latent 128, 4 head blocks, K=4, M backbone (l.23),
  weight decay 0.1 (l.25), --warmup_steps 2000 (l.26, ignored by the constant schedule), block
  8192 (l.27), betas (l.28-29), clip (l.30), seed 1 (l.32), 4 per device x 8 accumulation = 256 x
  8192 tokens (l.33, 35), 250k steps (l.37), saves every 50k (l.39), eval every 1000 (l.41), lr
  3e-4 constant (l.42-43), bf16 (l.50); files 02-29 of the Pile (l.9-15). Head: CALMConfig's
  defaults (noise 64, 8 samples, beta 1) and energy_score's 100 target samples drawn from the
  posterior (target_std_scale 1)."""
  _training(config, per_device=4, accum=8, block=8192, steps=250_000, save_steps=50_000)
  config.data.train = _PILE + "0[2-9].text.jsonl," + _PILE + "[12][0-9].text.jsonl"
  config.data.packing = "concat"
  config.data.document_eos = False
  config.model.update(vocab_size=LLAMA3_VOCAB, patch_size=4, latent_dim=128, head="energy",
                      num_head_blocks=4, noise_dim=64, num_model_samples=8,
                      num_target_samples=100, target_std_scale=1.0, beta=1.0,
                      beta_start=1.0, beta_anneal_steps=0,
                      rope_theta=10000.0, norm_eps=1e-6, layer_norm_eps=1e-6, init_std=0.02,
                      targets_bf16_embeddings_in_training=True)


def ar(config):
  """train/train_ar.sh: --config_overrides hidden 768, MLP 2048, 12 layers, 16 heads (l.20, size S),
  weight decay 0.1 (l.24), --warmup_steps 2000 (l.25, ignored by the constant schedule), block
  2048 (l.26), betas (l.27-28), clip (l.29), seed 1 (l.31), 4 per device x 32 accumulation =
  1024 x 2048 tokens (l.32, 34), 250k steps (l.36), saves every 50k (l.38), eval every 1000
  (l.40), lr 3e-4 constant (l.41-42), bf16 (l.49); files 00-29 of the Pile (l.8-14)."""
  _training(config, per_device=4, accum=32, block=2048, steps=250_000, save_steps=50_000)
  config.data.train = _PILE + "*.text.jsonl"
  config.data.packing = "concat"
  config.data.document_eos = False
  config.model.update(vocab_size=LLAMA3_VOCAB, rope_theta=10000.0, norm_eps=1e-6, init_std=0.02)


RECIPES = ("default", "paper")


def apply(recipe, recipe_fn, config):
  """config as the experiment file built it ('default'), or with recipe_fn applied ('paper')."""
  if recipe not in RECIPES:
    raise ValueError(f"Unknown recipe={recipe!r}; use one of {RECIPES}.")
  if recipe == "paper":
    recipe_fn(config)
  return config
