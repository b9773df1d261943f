r"""Builds (downloads nothing, composes) the `multi_digit_mnist` dataset of a config.

  python -m digit_vit.data.build --config=configs/default.py [--data_dir=DIR] \
      [--config.data.train_size=1000 ...]

Training builds it on first use too; run this beforehand to see the build time, or on multi-host
setups to prepare a shared data_dir once. Prints where the dataset lives and its split sizes.
"""

from __future__ import annotations

import time

from absl import app, flags

from digit_vit import cli

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS, argv: list[str] | None = None):
  """Defines the command's flags when it runs, not on import (`cli`): absl flags are global."""
  cli.define_data_flags(flag_values, argv)


def main(argv):
  del argv
  from digit_vit.data import input_pipeline  # pylint: disable=import-outside-toplevel
  config = FLAGS.config
  start = time.perf_counter()
  builder = input_pipeline.get_dataset_builder(config, FLAGS.data_dir)
  seconds = time.perf_counter() - start
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f"multi_digit_mnist/{builder.builder_config.name} ready at {builder.data_dir} "
        f"({seconds:.1f} s): {splits}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
