"""One command per experiment: generate the task's offline data, train every method over the seeds, evaluate
them as they train, and write the table and the learning curves.

    python scripts/reproduce.py grid                        # configs/reproduce/grid.yaml
    python scripts/reproduce.py maze --seeds 0 --methods bc ilql
    python scripts/reproduce.py configs/reproduce/grid.yaml --out runs/grid-sweep train.steps=500

Writes ``<out>/results.md``, ``results.json`` and ``learning_curves.png`` (default ``<out>`` =
``runs/reproduce/<name>``) and one run directory per method and seed; runs that already finished are reused
(``--fresh`` retrains them). The methods and their settings are in the experiment file (see
``jaxrl_lm/experiments/harness.py``); trailing ``key=value`` overrides apply to every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

from jaxrl_lm.config import REPO_ROOT
from jaxrl_lm.experiments.harness import load_experiment, run_experiment


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="name in configs/reproduce/ (grid, maze, ...) or a path to an experiment file")
    p.add_argument("--out", type=Path, default=None, help="output directory; default runs/reproduce/<name>")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="replace the experiment's seeds")
    p.add_argument("--methods", nargs="+", default=None, help="run only these methods")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. train.steps=500")
    return p.parse_intermixed_args(argv)  # overrides may follow options, as in the docstring's example


def experiment_path(name: str) -> Path:
    path = Path(name)
    return path if path.suffix in (".yaml", ".yml") else REPO_ROOT / "configs" / "reproduce" / f"{name}.yaml"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in args.overrides)}
    exp = load_experiment(experiment_path(args.experiment), overrides)
    if args.seeds:
        exp = dataclasses.replace(exp, seeds=tuple(args.seeds))
    out = args.out or Path("runs/reproduce") / exp.name
    results = run_experiment(exp, out, fresh=args.fresh, progress=not args.no_progress, methods=args.methods)
    print((out / "results.md").read_text(), end="")
    print(f"wrote {out}/results.md, results.json and learning_curves.png ({len(results['methods'])} methods, "
          f"seeds {list(exp.seeds)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
