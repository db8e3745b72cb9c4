"""Export a trained Q model as real low-bit integers: the packed format (`.zsq`), ONNX QDQ, and a size report.

`zsq.export(qmodel, "model.onnx")` is this package called as a function (`export_model`), so that the public
API reads as one verb while `zsq.export.load_packed` and the rest stay where they were.
"""
import sys
import types

from .packed import load_packed, pack_bits, pack_model, read_packed, save_packed, unpack_bits
from .report import format_report, size_report
from .run import export_model

__all__ = ["export_model", "format_report", "load_packed", "pack_bits", "pack_model", "read_packed", "save_packed",
           "size_report", "unpack_bits"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return export_model(*args, **kwargs)

    __call__.__doc__ = export_model.__doc__


sys.modules[__name__].__class__ = _CallablePackage
