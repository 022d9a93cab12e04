"""Training: the loop behind ``fqtorch train``, its config and fault-tolerant checkpoints."""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import DATASET_DEFAULTS, TrainConfig, load_config_file
from .errors import CheckpointError, TrainingError
from .loop import train

__all__ = [
    "DATASET_DEFAULTS",
    "CheckpointError",
    "TrainConfig",
    "TrainingError",
    "load_checkpoint",
    "load_config_file",
    "save_checkpoint",
    "train",
]
