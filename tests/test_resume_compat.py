"""Resume compatibility of a workdir's saved config (issue 14, item 1)."""
import os

import pytest

from calm_jax import config as config_lib
from calm_jax import runs
from calm_jax.training import loop

pytestmark = pytest.mark.unit


def test_default_tokenizer_rerun_is_not_refused(tmp_path):
  """The saved config holds the resolved tokenizer path; a rerun with the empty default resumes."""
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  config = config_lib.load_config_file("experiments/ar_baseline.py:size=tiny")
  config.data.tokenizer = ""
  saved = config.copy_and_resolve_references()
  saved.data.tokenizer = os.path.join(os.path.abspath(workdir), runs.WORKDIR_TOKENIZER)
  config_lib.save_config(saved, workdir)
  loop._check_workdir(config, workdir)        # raised "data.tokenizer: '.../tokenizer.model' -> ''"
  config.optim.lr = config.optim.lr * 2      # a real change is still refused
  with pytest.raises(config_lib.ConfigError, match="optim.lr"):
    loop._check_workdir(config, workdir)
