r"""calm-train: train one stage (autoencoder, calm, ar) from an experiment config, or --compile_only it.

  calm-train --config experiments/autoencoder.py:size=tiny --workdir W1 \
      [--config.train.steps=2000 ...] [--compile_only [--topology v5p-64]]

The trainer is calm_jax/training/loop.py (resume, init_from, SIGTERM, nan_policy);
--compile_only is training/compile.py. Multi-host flags: --distributed,
--coordinator_address, --num_processes, --process_id (parallel/distributed.py).
"""
import os

from absl import flags
from ml_collections import config_flags

from calm_jax import cli
from calm_jax import config as config_lib
from calm_jax import stages
from calm_jax.parallel import distributed
from calm_jax.training import compile as compile_lib
from calm_jax.training import loop

FLAGS = flags.FLAGS
EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "experiments")


def define_flags():
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file, e.g. experiments/autoencoder.py:size=tiny.",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it exists).")
  flags.DEFINE_bool(
      "compile_only", False, "Compile the train step for the mesh (or --topology), report the "
      "per-device memory and FLOPs into WORKDIR/compile_report.json, and exit without training.")
  flags.DEFINE_string(
      "topology", None, "With --compile_only: a TPU topology to compile for, e.g. v5p-64.")
  define_distributed_flags()


def define_distributed_flags():
  """--distributed and the explicit coordinator flags (values: parallel/distributed.plan)."""
  flags.DEFINE_enum(
      "distributed", "auto", distributed.MODES,
      "Multi-host setup: auto = jax.distributed.initialize() when a cluster is detected (TPU "
      "pod, srun with >1 task, mpirun, or the explicit coordinator flags/env below); on = "
      "always; off = single process.")
  flags.DEFINE_string(
      "coordinator_address", None,
      f"HOST:PORT of process 0's coordinator service (env {distributed.ENV_COORDINATOR}).")
  flags.DEFINE_integer("num_processes", None,
                       f"Number of processes of the run (env {distributed.ENV_NUM_PROCESSES}).")
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) "
                       f"(env {distributed.ENV_PROCESS_ID}).")


def paper_autoencoder_config(config):
  """The paper's base autoencoder with this CALM config's K, l and vocabulary.

  Used by --compile_only when config.autoencoder.workdir is not given: the
  memory check of a CALM run should not need a trained stage 1.
  """
  ae = config_lib.load_config_file(os.path.join(
      EXPERIMENTS, f"autoencoder.py:size=base,K={config.model.patch_size}"))
  ae.model.latent_dim = config.model.latent_dim
  ae.model.vocab_size = ae.data.vocab_size = config.model.vocab_size
  return ae


def compile_only(config, workdir, topology=None):
  """--compile_only, with the paper's autoencoder for a CALM config that links none."""
  ae_config = None
  if stages.get(config).needs_autoencoder and not config.autoencoder.workdir:
    ae_config = paper_autoencoder_config(config)
  return compile_lib.compile_only(config, workdir, topology, ae_config)


def main():
  if not FLAGS.workdir:
    raise cli.app.UsageError("--workdir is required.")
  if FLAGS.compile_only:
    compile_only(FLAGS.config, FLAGS.workdir, FLAGS.topology)
    return
  # First, before any other JAX call (multi-host runs).
  distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id)
  loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run():
  define_flags()
  cli.run_app(main, ["config"], [__name__])


if __name__ == "__main__":
  run()
