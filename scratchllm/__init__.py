"""scratchllm: build a GPT-style LLM from scratch and carry it through its whole life."""

from __future__ import annotations

__version__ = "0.1.0"
