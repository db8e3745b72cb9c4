"""Fake quantization: asymmetric uniform quantizer, per-channel weights, per-tensor EMA activation ranges."""
from .fake import fake_quantize, per_channel_range, quant_params, quantize_int
from .modules import ActQuantizer, QuantAct, QuantConv2d, QuantLinear, batch_range
from .placement import PLACEMENTS, default_placement, float_tensors, output_module
from .ranges import RANGE_SETTERS, bn_bounds, create_range_setter
from .surgery import (
                      QuantConfig,
                      act_quantizers,
                      calibrate,
                      check_bits,
                      gaussian_inputs,
                      observe_ranges,
                      quantize_model,
)

__all__ = ["ActQuantizer", "PLACEMENTS", "QuantAct", "QuantConfig", "QuantConv2d", "QuantLinear", "RANGE_SETTERS",
           "act_quantizers", "batch_range", "bn_bounds", "calibrate", "check_bits",
           "create_range_setter", "default_placement", "fake_quantize", "float_tensors", "gaussian_inputs",
           "observe_ranges", "output_module", "per_channel_range", "quant_params", "quantize_int", "quantize_model"]
