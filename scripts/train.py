"""Train a token-level Q-learning agent: ``python scripts/train.py --config configs/demo.yaml key=value ...``.

The same entry point is installed as the console script ``jaxrl-lm-train``; see jaxrl_lm/train/loop.py.
"""

from jaxrl_lm.train.loop import main

if __name__ == "__main__":
    main()
