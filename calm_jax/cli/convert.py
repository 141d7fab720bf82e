r"""calm-convert: reference (Hugging Face) CALM checkpoints into calm_jax workdirs, and back.

  calm-convert --input HF_DIR --output WORKDIR [--autoencoder HF_AE_DIR] [--tokenizer PATH]
  calm-convert --to hf --input WORKDIR --output HF_DIR [--step N]

HF_DIR is what the reference's save_pretrained writes: config.json and model.safetensors
or pytorch_model.bin (optionally sharded with an *.index.json; .bin needs
`pip install -e '.[convert]'`), and the tokenizer files (else --tokenizer). The kind
(Autoencoder or EnergyTransformer) is recognised from config.json's architectures or
the state-dict keys. A CALM checkpoint also writes WORKDIR/autoencoder, its frozen
autoencoder as a converted stage-1 workdir. The result works with calm-eval,
calm-generate, stage 2 (config.autoencoder.workdir) and config.init_from. The mapping
is in calm_jax/convert/ (workdirs.py describes both directions).
"""
from absl import app
from absl import flags

from calm_jax import cli

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("input", None, "A reference checkpoint directory (or, with --to hf, a "
                      "calm_jax workdir).")
  flags.DEFINE_string("output", None, "The calm_jax workdir to create (or, with --to hf, the "
                      "reference checkpoint directory).")
  flags.DEFINE_enum("to", "calm_jax", ["calm_jax", "hf"], "Direction of the conversion.")
  flags.DEFINE_string("autoencoder", None, "The reference Autoencoder checkpoint of a CALM "
                      "checkpoint (default: its ae_model.* weights).")
  flags.DEFINE_string("tokenizer", None, "tokenizer.json, a directory with one, or a .model "
                      "(default: the tokenizer files in --input).")
  flags.DEFINE_integer("step", None, "With --to hf: the checkpoint step (default: the latest).")


def main():
  from calm_jax.convert import workdirs  # pylint: disable=g-import-not-at-top
  if FLAGS.to == "hf":
    if FLAGS.autoencoder or FLAGS.tokenizer:
      raise app.UsageError("--autoencoder and --tokenizer are for the import direction.")
    summary = workdirs.export_checkpoint(FLAGS.input, FLAGS.output, FLAGS.step)
    print(f"Wrote the {summary['kind']} (step {summary['step']}, {summary['tensors']} tensors) "
          f"to {FLAGS.output}" + (f"; its autoencoder to {summary['autoencoder']}"
                                  if "autoencoder" in summary else ""))
    return
  summary = workdirs.import_checkpoint(FLAGS.input, FLAGS.output, FLAGS.autoencoder,
                                       FLAGS.tokenizer)
  print(f"Converted the {summary['kind']} into {FLAGS.output} (params digest "
        f"{summary['digest'][:16]}..., vocabulary {summary['vocab_size']})"
        + (f"; its autoencoder into {summary['autoencoder']}" if "autoencoder" in summary
           else ""))


def run():
  define_flags()
  cli.run_app(main, ["input", "output"], [__name__])


if __name__ == "__main__":
  run()
