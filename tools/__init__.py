"""Programs about the project, run from the repository's root as `python -m tools.NAME`; no stage
imports them.

  ablation.py  the paper's six-way ablation on the demo task (docs/ABLATION.md)
  bench.py     benchmarks, each beside its baseline in one run (docs/BENCHMARKS.md)
  assets.py    real files for tests and benchmarks, fetched from PyPI packages
"""
