"""environment.describe: what report.json and bench record about the code, packages and CPU."""

import json
import subprocess

import jax
import numpy as np

from digit_vit import environment


def _git(cwd, *args):
  return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                        cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_describe_names_the_installed_packages_and_backend():
  described = environment.describe()
  json.dumps(described)  # report.json and bench --json write it as it is.
  assert described["packages"]["jax"] == jax.__version__
  assert described["packages"]["numpy"] == np.__version__
  assert described["backend"] == jax.default_backend() == "cpu"
  assert described["device_kind"] == jax.devices()[0].device_kind
  assert described["cpu"] and described["cpu_count"] >= 1


def test_git_commit_and_whether_tracked_files_changed(tmp_path):
  assert environment.git_commit(tmp_path) is None  # Not a checkout.
  _git(tmp_path, "init", "-q")
  (tmp_path / "a.py").write_text("x = 1\n")
  _git(tmp_path, "add", "a.py")
  _git(tmp_path, "commit", "-q", "-m", "a")
  head = _git(tmp_path, "rev-parse", "HEAD")
  assert environment.git_commit(tmp_path) == {"commit": head, "dirty": False}
  (tmp_path / "notes.txt").write_text("untracked files are not the code\n")
  assert environment.git_commit(tmp_path) == {"commit": head, "dirty": False}
  (tmp_path / "a.py").write_text("x = 2\n")
  assert environment.git_commit(tmp_path) == {"commit": head, "dirty": True}
