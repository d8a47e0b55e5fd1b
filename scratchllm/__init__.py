"""scratchllm: build a GPT-style LLM from scratch and carry it through its whole life.

The Python API mirrors the command line:

    import scratchllm

    llm = scratchllm.load("runs/demo/model")        # a model directory, or "gpt2", "gpt2-medium", ...
    print(llm.generate("The", max_new_tokens=40, temperature=0.8, top_k=40))
    for piece in llm.stream("In Python,"):
        print(piece, end="")

    tok = scratchllm.train_bpe(["some text ..."], vocab_size=512)   # Stage 1: tokenizers
    model = scratchllm.GPTModel(scratchllm.preset_config("gpt2-small"))  # Stage 1: the model
    qwen = scratchllm.build_model(scratchllm.preset_config("nano", "qwen3"))  # or Llama 3, Gemma 3

The main classes are importable from here; submodules are imported on first use, so `import scratchllm`
stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ScratchLLMError": "scratchllm.errors",
    "LLM": "scratchllm.api",
    "load": "scratchllm.api",
    # Stage 1: text
    "load_tokenizer": "scratchllm.text.registry",
    "Tokenizer": "scratchllm.text.tokenizer",
    "SimpleTokenizer": "scratchllm.text.simple",
    "CharTokenizer": "scratchllm.text.char",
    "BPETokenizer": "scratchllm.text.bpe",
    "HFTokenizer": "scratchllm.text.hf_tokenizer",
    "train_bpe": "scratchllm.text.bpe",
    "GPTDatasetV1": "scratchllm.text.sampling",
    "create_dataloader": "scratchllm.text.sampling",
    "prepare": "scratchllm.text.prepare",
    # Stage 1: model and generation
    "GPTConfig": "scratchllm.model.gpt",
    "GPTModel": "scratchllm.model.gpt",
    "MultiHeadAttention": "scratchllm.model.attention",
    "TransformerBlock": "scratchllm.model.gpt",
    "SimpleTokenizerV2": "scratchllm.text.simple",
    "preset_config": "scratchllm.model.registry",
    "build_model": "scratchllm.model.registry",
    "Transformer": "scratchllm.model.transformer",
    "TransformerConfig": "scratchllm.model.transformer",
    "Llama3Config": "scratchllm.model.llama3",
    "Qwen3Config": "scratchllm.model.qwen3",
    "Qwen3MoEConfig": "scratchllm.model.qwen3",
    "Gemma3Config": "scratchllm.model.gemma3",
    "Engine": "scratchllm.generation",
    "GenerationConfig": "scratchllm.generation",
    "generate": "scratchllm.generation",
    "generate_text_simple": "scratchllm.generation",
    "majority_vote": "scratchllm.evals.voting",
    "load_model": "scratchllm.hub",
    "save_model": "scratchllm.checkpoint",
    # Stage 2: training
    "Trainer": "scratchllm.train.trainer",
    "TrainerConfig": "scratchllm.train.trainer_config",
    "PretrainConfig": "scratchllm.train.pretrain",
    "pretrain": "scratchllm.train.pretrain",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'scratchllm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
