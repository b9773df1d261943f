"""Log filtering shared by the command-line entry points."""

import logging as std_logging

from absl import logging


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO and WARNING chatter of TFDS and orbax (the dataset config on every builder,
  checkpoint bookkeeping) so progress bars and our own messages stay readable; their errors
  still pass."""

  def filter(self, record):
    noisy = any(name in record.pathname for name in ("tensorflow_datasets", "orbax"))
    return record.levelno >= std_logging.ERROR or not noisy


def quiet_libraries() -> None:
  """Installs the filter on absl's handler and the root logger's handlers."""
  for handler in [logging.get_absl_handler(), *std_logging.getLogger().handlers]:
    handler.addFilter(_QuietLibraries())
