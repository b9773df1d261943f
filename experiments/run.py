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

import argparse
import shlex
import sys
import time

from experiments import sweep as sweep_lib


def _parse_set(items):
  """['key=value', ...] -> {key: value}; values stay text (parsed as --config.key=value)."""
  out = {}
  for item in items or []:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise SystemExit(f"--set {item!r} is not key=value (e.g. --set=num_train_steps=500)")
    out[key.removeprefix("config.")] = value
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.run",
                                   description=__doc__.split("\n", 1)[0])
  parser.add_argument("sweeps", nargs="+",
                      help="sweep files, or names in experiments/sweeps/ (e.g. patch_size)")
  parser.add_argument("--quick", action="store_true",
                      help="the shrunk mode: a few minutes a sweep on a laptop CPU")
  parser.add_argument("--results_dir", default=None,
                      help="root of the results (default experiments/results, or "
                           "runs/experiments-quick with --quick)")
  parser.add_argument("--workdir_root", default=None,
                      help="root of the points' workdirs (default runs/sweeps[-quick])")
  parser.add_argument("--dry_run", action="store_true",
                      help="print the commands of the points still to run; run nothing")
  parser.add_argument("--collect_only", action="store_true",
                      help="run nothing; collect finished workdirs and write the table")
  parser.add_argument("--only", default="",
                      help="comma-separated labels or grid indices of the points to run")
  parser.add_argument("--retry_failed", action="store_true",
                      help="run again the points recorded as failed")
  parser.add_argument("--costly", action="store_true",
                      help="also run the sweep's costly points (hours each on a laptop CPU)")
  parser.add_argument("--set", action="append", dest="extra", metavar="KEY=VALUE",
                      help="an override for every point (repeatable; changes the hashes)")
  parser.add_argument("--estimate", action="store_true",
                      help="time a few train steps of every point here and estimate the run")
  args = parser.parse_args(argv)
  extra = _parse_set(args.extra)
  only = [s.strip() for s in args.only.split(",") if s.strip()]
  for name in args.sweeps:
    sweep = sweep_lib.load_sweep(name)
    # The command that remakes this sweep's results, quoted in its results.md.
    path = name if name.endswith(".py") else f"experiments/sweeps/{name}.py"
    command = shlex.join(["python", "-m", "experiments.run", path]
                         + ["--quick"] * args.quick + ["--costly"] * args.costly
                         + [f"--set={item}" for item in args.extra or []])
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
  sys.exit(main())
