r"""Builds (downloads nothing, composes) the `multi_digit_mnist` dataset of a config.

  python -m digit_vit.data.build --config=configs/default.py [--data_dir=DIR] \
      [--config.data.train_size=1000 ...]

Training builds it on first use too; run this beforehand to see the build time, or on multi-host
setups to prepare a shared data_dir once. Prints where the dataset lives and its split sizes.
"""

from __future__ import annotations

import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=False)
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "Where to build; default config.data.data_dir, else ./data/tfds.")


def main(argv):
  del argv
  from digit_vit.data import input_pipeline  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  start = time.perf_counter()
  builder = input_pipeline.get_dataset_builder(config, _DATA_DIR.value)
  seconds = time.perf_counter() - start
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f"multi_digit_mnist/{builder.builder_config.name} ready at {builder.data_dir} "
        f"({seconds:.1f} s): {splits}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
