r"""Runs sweeps: each point trains in its own process, then the table and plots are written.

  python -m experiments.run experiments/sweeps/patch_size.py            # full mode
  python -m experiments.run patch_size loss --quick                     # quick mode, 2 sweeps
  python -m experiments.run patch_size --dry_run                        # the commands only
  python -m experiments.run patch_size --only=8x8                       # one point
  python -m experiments.run patch_size --costly                         # with the 4x4 point
  python -m experiments.run patch_size --collect_only                   # tabulate what is done
  python -m experiments.run patch_size --estimate                       # time it here first
  python -m experiments.run patch_size --set=num_train_steps=500        # change every point

Run from the repo root. Re-running skips finished points (keyed by the hash of the resolved
config); see experiments/sweep.py and experiments/README.md.
"""

from __future__ import annotations

import shlex
import time

from absl import app, flags

from digit_vit import cli
from experiments import sweep as sweep_lib

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS):
  """Defines the command's flags when it runs, not on import (`digit_vit.cli`): absl flags are
  global. The sweeps themselves are the arguments."""
  for name, text in (
      ("quick", "The shrunk mode: a few minutes a sweep on a laptop CPU."),
      ("dry_run", "Print the commands of the points still to run; run nothing."),
      ("collect_only", "Run nothing; collect finished workdirs and write the table."),
      ("retry_failed", "Run again the points recorded as failed."),
      ("costly", "Also run the sweep's costly points (hours each on a laptop CPU)."),
      ("estimate", "Time a few train steps of every point here and estimate the run.")):
    flags.DEFINE_bool(name, False, text, flag_values=flag_values)
  flags.DEFINE_string("results_dir", None, "Root of the results (default experiments/results, "
                      "or runs/experiments-quick with --quick).", flag_values=flag_values)
  flags.DEFINE_string("workdir_root", None, "Root of the points' workdirs (default "
                      "runs/sweeps[-quick]).", flag_values=flag_values)
  flags.DEFINE_string("only", "", "Comma-separated labels or grid indices of the points to run.",
                      flag_values=flag_values)
  flags.DEFINE_multi_string("set", [], "KEY=VALUE: an override for every point (repeatable; "
                            "changes the hashes).", flag_values=flag_values)


def _parse_set(items):
  """['key=value', ...] -> {key: value}; values stay text (parsed as --config.key=value).

  Raises:
    ValueError: an item that is not key=value.
  """
  out = {}
  for item in items or []:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--set {item!r} is not key=value (e.g. --set=num_train_steps=500)")
    out[key.removeprefix("config.")] = value
  return out


def main(argv, flag_values: flags.FlagValues = FLAGS) -> int:
  if len(argv) < 2:
    return cli.error("give one or more sweeps: sweep files, or names in experiments/sweeps/ "
                     "(e.g. patch_size)", cli.USAGE)
  args = flag_values
  try:
    extra = _parse_set(args["set"].value)
  except ValueError as e:
    return cli.error(str(e), cli.USAGE)
  only = [s.strip() for s in args.only.split(",") if s.strip()]
  for name in argv[1:]:
    sweep = sweep_lib.load_sweep(name)
    # The command that remakes this sweep's results, quoted in its results.md.
    path = name if name.endswith(".py") else f"experiments/sweeps/{name}.py"
    command = shlex.join(["python", "-m", "experiments.run", path]
                         + ["--quick"] * args.quick + ["--costly"] * args.costly
                         + [f"--set={item}" for item in args["set"].value])
    mode = "quick" if args.quick else "full"
    print(f"== {sweep.name} ({mode} mode): {sweep.title}", flush=True)
    if args.estimate:
      pts = sweep_lib.points(sweep, quick=args.quick, workdir_root=args.workdir_root,
                             extra=extra)
      rows = sweep_lib.estimate(pts, log=lambda m: print(m, flush=True))
      total = sum(r["seconds"] for r in rows)
      print(f"{sweep.name}: about {total / 60:.0f} min for {len(rows)} points here", flush=True)
      continue
    start = time.perf_counter()
    sweep_lib.run_sweep(sweep, quick=args.quick, results_dir=args.results_dir,
                        workdir_root=args.workdir_root, extra=extra, dry_run=args.dry_run,
                        collect_only=args.collect_only, only=only,
                        retry_failed=args.retry_failed, costly=args.costly,
                        command=command,
                        log=lambda m: print(m, flush=True))
    print(f"== {sweep.name}: {time.perf_counter() - start:.0f} s", flush=True)
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
