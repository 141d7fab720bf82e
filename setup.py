"""calm_jax: Continuous Autoregressive Language Models in JAX/Flax."""
import setuptools

setuptools.setup(
    name="calm_jax",
    version="0.1.0",
    description="JAX/Flax pretraining for Continuous Autoregressive Language Models (CALM).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["calm_jax", "calm_jax.*", "experiments"]),
    install_requires=[
        # 0.10.x is the last line for Python 3.11; 0.11.x (Python >= 3.12) is what current GPU
        # images ship with the CUDA 13 plugin: both resolve with the pins below (the pip
        # --dry-run commands and what they install: benchmarks/RESULTS.md, "GPU check").
        "jax>=0.10.2,<0.12",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "tensorflow-datasets>=4.9.10,<5",
        "importlib_resources>=6",          # tfds builders import it; not pulled in by tfds itself
        "sentencepiece>=0.2.3,<0.3",
        "ml-collections>=1.1.0,<2",
        "array-record>=0.8.6,<0.9",
        "zstandard>=0.22,<1",              # .zst data files (the Pile's jsonl.zst)
        "pyarrow>=14",                     # parquet: data SPECs
        "numpy>=2.0",
        "absl-py>=2.3",
        "tqdm>=4.66",
        "tensorboardX>=2.6.5",
        "matplotlib>=3.9",
        "tokenizers>=0.19",                # Hugging Face tokenizer.json (the reference's Llama-3)
        "ml-dtypes>=0.5",                  # bfloat16 safetensors (also a jax dependency)
    ],
    extras_require={
        # safetensors: the official reader cross-checks calm_jax's own in the tests.
        # wandb: the offline Weights & Biases test runs from a clean checkout.
        "test": ["pytest>=8", "safetensors>=0.4", "wandb>=0.19,<1"],
        # Weights & Biases logging (config.log.wandb_project).
        "wandb": ["wandb>=0.19,<1"],
        # pytorch_model.bin checkpoints (calm-convert reads safetensors without torch).
        "convert": ["torch>=2.4"],
        # calm-prepare --runner beam (Dataflow, Flink, Spark; tested on the DirectRunner).
        "beam": ["apache-beam>=2.60,<3"],
    },
    entry_points={
        "console_scripts": [
            "calm-tokenizer=calm_jax.cli.tokenizer:run",
            "calm-prepare=calm_jax.cli.prepare:run",
            "calm-train=calm_jax.cli.train:run",
            "calm-eval=calm_jax.cli.eval:run",
            "calm-generate=calm_jax.cli.generate:run",
            "calm-quickstart=calm_jax.cli.quickstart:run",
            "calm-diagnose=calm_jax.cli.diagnose:run",
            "calm-convert=calm_jax.cli.convert:run",
            "calm-plot=calm_jax.cli.plot:run",
        ]
    },
)
