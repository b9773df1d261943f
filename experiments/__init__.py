"""Sweeps over configs that reproduce the seeds' lessons; see experiments/README.md.

  python -m experiments.run experiments/sweeps/patch_size.py [--quick] [--dry_run]
"""
