"""Whole models and their checkpoints."""

from .checkpoint import (CheckpointError, check_state_dict, checkpoint_config_name, load_checkpoint, load_weights,
                         read_state_dict)
from .moce_ir import MoCEIR

__all__ = ["CheckpointError", "MoCEIR", "check_state_dict", "checkpoint_config_name", "load_checkpoint", "load_weights",
           "read_state_dict"]
