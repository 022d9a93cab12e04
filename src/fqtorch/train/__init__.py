"""Training: the loop behind ``fqtorch train``, its config, run directories and fault-tolerant
checkpoints."""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import DATASET_DEFAULTS, TrainConfig, load_config_file
from .errors import CheckpointError, Diverged, TrainingError, TrainingInterrupted
from .loop import train
from .rundir import latest_run, new_run_dir, resume_options

__all__ = [
    "DATASET_DEFAULTS",
    "CheckpointError",
    "Diverged",
    "TrainConfig",
    "TrainingError",
    "TrainingInterrupted",
    "latest_run",
    "load_checkpoint",
    "load_config_file",
    "new_run_dir",
    "resume_options",
    "save_checkpoint",
    "train",
]
