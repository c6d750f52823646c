"""Chat messages to model inputs: media, chat template, tokenizer, placeholder expansion, M-RoPE."""
from qwen2vl.processor.budget import MediaBudget
from qwen2vl.processor.fetch import MediaPolicy
from qwen2vl.processor.image import smart_resize
from qwen2vl.processor.mrope import mrope_positions
from qwen2vl.processor.processor import Processor
from qwen2vl.processor.tokenizer import IncrementalDetokenizer, Tokenizer
from qwen2vl.processor.types import PreparedPrompt, VisionItem

__all__ = [
    "IncrementalDetokenizer",
    "MediaBudget",
    "MediaPolicy",
    "PreparedPrompt",
    "Processor",
    "Tokenizer",
    "VisionItem",
    "mrope_positions",
    "smart_resize",
]
