"""Export a trained Q model as real low-bit integers: the packed format (`.zsq`) and its size report."""
from .packed import load_packed, pack_bits, pack_model, read_packed, save_packed, unpack_bits
from .report import format_report, size_report

__all__ = ["format_report", "load_packed", "pack_bits", "pack_model", "read_packed", "save_packed", "size_report",
           "unpack_bits"]
