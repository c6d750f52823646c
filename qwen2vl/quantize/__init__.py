"""Post-training 4-bit quantization of a checkpoint to the AWQ GEMM format (`qwen2vl quantize`)."""
from qwen2vl.quantize.awq import BUILT_IN_CALIBRATION, default_calibration, quantize, read_calibration

__all__ = ["BUILT_IN_CALIBRATION", "default_calibration", "quantize", "read_calibration"]
