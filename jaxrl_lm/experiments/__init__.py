"""Entry points on top of the engine: a run from a config (data, evaluation hooks, the loop), seed studies and
experiment files with their tables and learning curves.

- ``run.run(cfg)``: what ``scripts/train.py`` does: resolves ``data.path: task:NAME``, adds the evaluation hook
  of the ``eval`` section and calls ``jaxrl_lm.train.loop.train``; ``run.train_seeds`` and ``run.batches`` are
  the notebook forms.
- ``harness``: experiment files (``configs/reproduce/*.yaml``): every method over seeds, tables, curves.
- ``hooks``: the evaluation hook; ``plots``: tables and learning-curve figures.
"""
