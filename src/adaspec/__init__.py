"""adaspec: adaptive speculative decoding for Hugging Face language models."""

from adaspec.core.config import GenerationConfig, SamplingConfig
from adaspec.core.decode import GenerationResult, Step, generate
from adaspec.core.errors import AdaspecError

__all__ = ["AdaspecError", "GenerationConfig", "GenerationResult", "SamplingConfig", "Step", "generate"]
__version__ = "0.1.0"
