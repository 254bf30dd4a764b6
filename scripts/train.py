"""Train an agent: ``python scripts/train.py --config configs/demo.yaml key=value ...``.

The same entry point is installed as the console script ``jaxrl-lm-train``; see jaxrl_lm/experiments/run.py.
"""

from jaxrl_lm.experiments.run import main

if __name__ == "__main__":
    main()
