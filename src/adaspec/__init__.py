"""adaspec: adaptive speculative decoding for Hugging Face language models."""

from adaspec.config import GenerationConfig, SamplingConfig
from adaspec.decode import GenerationResult, Step, generate
from adaspec.errors import AdaspecError

__all__ = ["AdaspecError", "GenerationConfig", "GenerationResult", "SamplingConfig", "Step", "generate"]
__version__ = "0.1.0"
