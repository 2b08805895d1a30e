"""glm5c: a compiled-graph inference engine for GLM-5."""

from .llm import LLM, RequestOutput
from .sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
