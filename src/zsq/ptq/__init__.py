"""Data-free post-training quantization: learned rounding and steps, reconstructed block by block
(`zsq.ptq.reconstruct`). Spec: ../shared/specs/ptq.md."""
from .lsq import LsqAct
from .reconstruct import PtqConfig, ReconLayer, finish, prepare, reconstruct, reconstruct_unit
from .rounding import LearnedRounding, beta_at, rounding_penalty, search_range, soft_bit
from .units import Unit, block_names, find_units

__all__ = ["LearnedRounding", "LsqAct", "PtqConfig", "ReconLayer", "Unit", "beta_at", "block_names", "find_units",
           "finish", "prepare", "reconstruct", "reconstruct_unit", "rounding_penalty", "search_range", "soft_bit"]
