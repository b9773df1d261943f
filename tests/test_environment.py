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
  assert described["backend"] == jax.default_backend()  # cpu here, gpu or tpu elsewhere
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


def test_the_cpu_is_named_with_its_family_and_model(tmp_path, monkeypatch):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"
                     "model\t\t: 85\nmodel name\t: Intel(R) Xeon(R) Gold 6148\n"
                     "flags\t\t: fpu sse4_2 avx avx2 fma\n\n"
                     "processor\t: 1\nmodel name\t: a second processor, not read\n")

  def read_again(path):
    monkeypatch.setattr(environment, "CPUINFO", str(path))
    environment._cpuinfo.cache_clear()  # pylint: disable=protected-access

  try:
    read_again(cpuinfo)
    assert environment.cpu_model() == "Intel(R) Xeon(R) Gold 6148 (family 6, model 85)"
    assert environment.cpu_vector_extensions() == "avx2"
    read_again(tmp_path / "none")  # Off Linux: what `platform` knows, and no extension.
    assert environment.cpu_model() and "family" not in environment.cpu_model()
    assert environment.cpu_vector_extensions() == ""
  finally:
    monkeypatch.undo()
    environment._cpuinfo.cache_clear()  # pylint: disable=protected-access
