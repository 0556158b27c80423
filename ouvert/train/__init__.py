"""Training: one loop (loop.py) for every objective (objectives.py), on one process or many
(distributed.py)."""

from ouvert.train.loop import TrainConfig, train

__all__ = ["TrainConfig", "train"]
