"""Training runs on top of the engine: config, trainer, checkpoints, metrics (see `bigbatch train`)."""

from .config import TrainConfig
from .interrupt import TrainingInterrupted
from .trainer import NonFiniteLossError, Trainer

__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer", "TrainingInterrupted"]
