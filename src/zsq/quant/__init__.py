"""Fake quantization: asymmetric uniform quantizer, per-channel weights, per-tensor EMA activation ranges."""
from .fake import fake_quantize, per_channel_range, quant_params, quantize_int
from .modules import ActQuantizer, QuantAct, QuantConv2d, QuantLinear
from .surgery import (
                      QuantConfig,
                      act_quantizers,
                      calibrate,
                      check_bits,
                      gaussian_inputs,
                      observe_ranges,
                      quantize_model,
)

__all__ = ["ActQuantizer", "QuantAct", "QuantConfig", "QuantConv2d", "QuantLinear", "act_quantizers", "calibrate",
           "check_bits", "fake_quantize", "gaussian_inputs", "observe_ranges", "per_channel_range",
           "quant_params", "quantize_int", "quantize_model"]
