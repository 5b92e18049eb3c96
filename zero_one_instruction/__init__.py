"""zero-one-instruction: Japanese SFT data from base prompts, evolved with an LLM on vLLM."""

__version__ = "0.1.0"
