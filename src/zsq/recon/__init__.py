"""Block reconstruction for post-training quantization: learned rounding and steps, fitted unit by unit to the
teacher's outputs (`reconstruct`). The job around it (data, evaluation, run folder) is `zsq.ptq`.
Spec: ../shared/specs/ptq.md."""
from .lsq import LsqAct
from .reconstruct import (USER_NAMES, ReconConfig, ReconLayer, finish, output_gradients, prepare, reconstruct,
                          reconstruct_unit)
from .rounding import LearnedRounding, beta_at, rounding_penalty, search_range, soft_bit
from .units import Unit, block_names, find_units

__all__ = ["USER_NAMES", "LearnedRounding", "LsqAct", "ReconConfig", "ReconLayer", "Unit", "beta_at", "block_names",
           "find_units", "finish", "output_gradients", "prepare", "reconstruct", "reconstruct_unit", "rounding_penalty",
           "search_range", "soft_bit"]
