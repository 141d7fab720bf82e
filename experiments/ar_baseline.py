r"""The AR baseline: a token-level Llama-style Transformer with the CALM backbone.

  calm-train --config experiments/ar_baseline.py:size=tiny --workdir W_AR \
    --config.data.train='jsonl:../shared/data/corpus/train-*.jsonl' \
    --config.data.eval=jsonl:../shared/data/corpus/valid.jsonl

Variants: size=tiny|S|M|L (the paper's Transformer-S/M/L baselines), mesh=<common.MESHES>,
recipe=default|paper.
  tiny: 2 CPU cores, minutes; the loss falls below 6 nats within 500 steps.
  S/M/L: accelerators; seq_len 2048, global batch 256.
  recipe=paper (size=S|M|L): the reference's train/train_ar.sh exactly: size S l.20, optimizer
  l.24-29, 4 x 8 GPUs x 32 = 1024 x 2048 tokens l.26, 32, 34, 250k steps l.36, lr 3e-4 constant
  l.41-42, bf16 l.49 (experiments/paper.py, line by line).
"""
from experiments import common
from experiments import paper

SIZES = {
    "tiny": dict(vocab_size=512, seq_len=256, batch_size=16, steps=1000, lr=1e-3),
    "S": dict(vocab_size=32768, seq_len=2048, batch_size=256, steps=250_000, lr=3e-4),
    "M": dict(vocab_size=32768, seq_len=2048, batch_size=256, steps=250_000, lr=3e-4),
    "L": dict(vocab_size=32768, seq_len=2048, batch_size=256, steps=250_000, lr=3e-4),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, size="tiny", mesh="local", recipe="default")
  s = SIZES[arg.size]
  config = common.run_config("ar", arg.mesh, s)
  config.eval.block_len = s["seq_len"]     # the paper evaluates the AR baseline on 2048-token blocks
  config.model = common.backbone_config(arg.size, s["vocab_size"], patch_size=1)
  config.model.logits_chunk = 512        # positions whose float32 logits exist at once (loss and
                                         # eval, losses.map_chunks); 0: the whole sequence
  if arg.recipe == "paper" and arg.size not in ("S", "M", "L"):
    raise ValueError(f"ar_baseline.py: recipe=paper is train_ar.sh: use size=S|M|L "
                     f"(got size={arg.size}).")
  return paper.apply(arg.recipe, paper.ar, config)
