"""Model directories: the one checkpoint format.

A model directory holds everything needed to rebuild a model, and nothing executable:

    config.json        {"format": "scratchllm-model", "version": 1,
                        "model": {the config's fields, "architecture" first (model/registry.py)},
                        "extra": {task-specific, e.g. class labels},
                        "lora": {rank, alpha, dropout, layers}: only when LoRA adapters are stored
                        "info": {parameters, dtype, writer: for people, never read back}}
    model.safetensors  the weights by parameter name; a tied head is stored once (as tok_emb.weight);
                       LoRA adapters unmerged as `<layer>.lora.A` / `.lora.B` (model/lora.py)
    tokenizer files    what `Tokenizer.save` writes (tokenizer_meta.json + the kind's own files)

Other files may sit beside these (the trainer keeps its state there); loading ignores them.
Loading never unpickles: weights come from safetensors only, and every mismatch between
config.json and the weights is an error that names the tensor and both shapes.

directory.py writes and reads model directories; weights.py, safetensors files and state dicts.
Hub names such as `gpt2` are hub/'s business: `hub.load_model` takes those as well as directories.
"""

from .directory import (
    CONFIG_KEYS,
    DTYPES,
    FORMAT,
    VERSION,
    WEIGHTS_FILE,
    LoadedModel,
    load_model,
    meta_model,
    missing_model_error,
    read_config,
    read_lora_config,
    save_model,
    write_error,
    write_model_files,
)
from .weights import (
    check_finite,
    check_state_dict,
    load_state_dict_strict,
    model_tensors,
    read_weights,
    unwrap_model,
    write_weights,
)

__all__ = [
    "CONFIG_KEYS",
    "DTYPES",
    "FORMAT",
    "VERSION",
    "WEIGHTS_FILE",
    "LoadedModel",
    "check_finite",
    "check_state_dict",
    "load_model",
    "load_state_dict_strict",
    "meta_model",
    "missing_model_error",
    "model_tensors",
    "read_config",
    "read_lora_config",
    "read_weights",
    "save_model",
    "unwrap_model",
    "write_error",
    "write_model_files",
    "write_weights",
]
