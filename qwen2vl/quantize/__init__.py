"""Post-training 4-bit quantization of a checkpoint to the AWQ GEMM format (`qwen2vl quantize`)."""
from qwen2vl.quantize.awq import default_calibration, quantize, read_calibration

__all__ = ["default_calibration", "quantize", "read_calibration"]
