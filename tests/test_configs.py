"""Config files: all load and build their model; overrides follow references; typos are errors;
a rerun may change only the fields a resume can follow."""

import json
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from digit_vit import config_lib
from digit_vit.models import ModelConfig, build_model

# The code under test never touches devices (tests/test_device_passes.py checks), so `make test`
# runs these tests once, on one device, not again on 8 fake ones.
pytestmark = pytest.mark.any_device_count

CONFIGS = sorted(p.stem for p in config_lib.CONFIG_DIR.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_a_valid_model(name):
  config = config_lib.load(name)
  model_config = ModelConfig.from_config(config.model)
  assert (model_config.image_height, model_config.image_width) == (config.image_height,
                                                                   config.image_width)
  if config.task == "read":
    # The decoder reads past the training lines: up to decode.max_length digits.
    assert model_config.max_length >= config.decode.max_length + 1 >= config.max_digits + 1
  build_model(config)


def test_bench_config_is_the_fixed_architecture():
  config = config_lib.load("bench")
  m = ModelConfig.from_config(config.model)
  assert (m.image_height, m.image_width, m.image_channels) == (32, 192, 1)
  assert m.patch_size == (8, 8) and m.patch_embedding == "linear"
  assert (m.width, m.num_heads, m.mlp_dim, m.activation) == (128, 4, 512, "gelu")
  assert (m.encoder_layers, m.decoder_layers, m.norm) == (4, 2, "pre")
  assert (m.encoder_position, m.decoder_position) == ("learned", "learned")
  assert m.max_length + 1 == 10 and config.batch_size == 128


def test_shared_fields_follow_the_top_level_value():
  config = config_lib.load("default")
  config.max_digits = 5
  config.image_width = 128
  assert config.model.image_width == 128 and config.data.image_width == 128
  assert config.data.max_digits == 5


def test_quick_arg_shrinks_the_config():
  full, quick = config_lib.load("default"), config_lib.load("default", "quick")
  assert quick.model.encoder_layers < full.model.encoder_layers or (
      quick.num_train_steps < full.num_train_steps)


def _parse(argv):
  flag_values = flags.FlagValues()
  # The override flags (--config.x) are found from the arguments given at definition.
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values,
                                  sys_argv=["prog"] + argv)
  flag_values(["prog"] + argv)
  return flag_values.config


def test_command_line_overrides_apply():
  path = str(config_lib.CONFIG_DIR / "default.py")
  config = _parse([f"--config={path}", "--config.model.num_heads=8",
                   "--config.max_digits=4"])
  assert config.model.num_heads == 8
  assert config.max_digits == 4 and config.data.max_digits == 4


def test_override_typo_is_an_error():
  path = str(config_lib.CONFIG_DIR / "default.py")
  with pytest.raises(Exception, match="modle"):
    _parse([f"--config={path}", "--config.modle.num_heads=8"])
  with pytest.raises(Exception, match="num_haeds"):
    _parse([f"--config={path}", "--config.model.num_haeds=8"])


def test_missing_config_file_names_the_place():
  with pytest.raises(FileNotFoundError, match="configs"):
    config_lib.load(pathlib.Path("no_such_config.py"))


# ---- What a rerun in an existing run's workdir may change


def test_a_resume_may_change_only_the_resumable_fields():
  saved = json.loads(config_lib.load("tiny").to_json_best_effort())
  config = config_lib.load("tiny")
  config.num_train_steps, config.progress_bar, config.eval_splits = 600, True, ("test",)
  config.parallelism, config.keep_best_checkpoints = "pmap", 3
  config.decode.beam_size, config.data.data_dir = 4, "/elsewhere/tfds"
  assert config_lib.resume_differences(saved, config) == []
  config.model.width, config.learning_rate, config.image_width = 64, 0.01, 96
  assert config_lib.resume_differences(saved, config) == [
      "data.image_width: 48 -> 96", "image_width: 48 -> 96", "learning_rate: 0.0015 -> 0.01",
      "model.image_width: 48 -> 96", "model.width: 32 -> 64"]


def test_fields_added_or_removed_since_a_run_was_saved():
  config = config_lib.load("tiny")
  saved = json.loads(config.to_json_best_effort())
  del saved["ema_decay"], saved["model"]["stem_depth"]  # Fields the code gained since.
  saved["retired_field"] = 1  # A field the code lost since.
  # Options removed from the code, at the values that behave as the code does now.
  saved["sam_rho"], saved["model"]["stem_antialias"] = 0.0, False
  # At their default values, the new fields keep the behaviour from before they existed.
  assert config_lib.resume_differences(saved, config) == ["retired_field: 1 -> (none)"]
  config.ema_decay = 0.9
  saved["sam_rho"] = 0.05  # A removed option that was on: the run trained otherwise.
  assert config_lib.resume_differences(saved, config) == [
      "ema_decay: (none) -> 0.9", "retired_field: 1 -> (none)", "sam_rho: 0.05 -> (none)"]


def test_removed_options_at_their_neutral_values_are_dropped_from_saved_configs():
  saved = json.loads(config_lib.load("tiny").to_json_best_effort())
  saved["sam_rho"], saved["data"]["augment"]["keep_inside"] = 0.0, False
  saved["model"].update(stem_full_res_depth=0, stem_antialias=True)
  dropped = config_lib.drop_removed(saved)
  assert "sam_rho" not in dropped and "keep_inside" not in dropped["data"]["augment"]
  assert "stem_full_res_depth" not in dropped["model"]
  # On, it stays: the model it shaped cannot be rebuilt without it, which is then an error.
  assert dropped["model"]["stem_antialias"] is True
  with pytest.raises(ValueError, match=r"unknown model config keys \['stem_antialias'\]"):
    ModelConfig.from_config(dropped["model"])
  assert saved["sam_rho"] == 0.0  # The argument is left as it was.
  # Today's configs hold none of them.
  flat = config_lib.flatten(config_lib.load("default"))
  assert not set(config_lib.REMOVED_FIELDS) & set(flat)


def test_check_resume_refuses_another_config_only_where_there_are_checkpoints(tmp_path):
  (tmp_path / "config.json").write_text(config_lib.load("tiny").to_json_best_effort(indent=2))
  before = (tmp_path / "config.json").read_bytes()
  config = config_lib.load("tiny")
  config.model.num_heads = 4
  with pytest.raises(config_lib.ConfigMismatchError) as error:
    config_lib.check_resume(tmp_path, config, has_checkpoints=True)
  message = str(error.value)
  assert "model.num_heads: 2 -> 4" in message and "new --workdir" in message
  assert "\n" not in message and isinstance(error.value, ValueError)
  assert (tmp_path / "config.json").read_bytes() == before
  # Nothing to keep consistent: a run stopped before its first checkpoint, or a new workdir.
  config_lib.check_resume(tmp_path, config, has_checkpoints=False)
  config_lib.check_resume(tmp_path / "new", config, has_checkpoints=True)
