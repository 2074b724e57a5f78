"""leanserve gateway: OpenAI-compatible HTTP in front of vLLM engines. Imports neither torch nor vllm."""
__version__ = "0.1.0"
