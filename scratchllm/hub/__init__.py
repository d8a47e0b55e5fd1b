"""Models from the Hugging Face hub and back: hub names, downloads, conversions, exports.

- `load_model(spec)`: a model directory, or a hub name (`gpt2`, `gpt2-medium`, `124M`, ...) whose
  converted model directory comes from the cache, downloaded and converted on first use
  (`$SCRATCHLLM_HOME/models/NAME`, default `~/.cache/scratchllm/models/NAME`). fetch.py.
- `download_command`: fetch `openai-community/gpt2[-medium|-large|-xl]` through huggingface_hub (its
  cache, resume, progress bar; `HF_HUB_OFFLINE` respected) and convert it; `convert_hf_dir` does
  the conversion alone, for a local copy and without a network. convert.py.
- `export_hf`: a model directory -> a directory `transformers.GPT2LMHeadModel.from_pretrained`
  (and `GPT2TokenizerFast`) loads. export.py.
- `export_gguf`: a model directory -> one GGUF file that llama.cpp and Ollama run, with an Ollama
  Modelfile beside it. gguf_export.py (weights, hyperparameters), gguf_tokenizer.py, gguf_modelfile.py.
- `model_info`: `scratchllm info`. info.py.

Each family's weight-name table and config conversion are in model/ (model/gpt2_hf.py for GPT-2),
found through model/registry.py.
"""

from .convert import (
    HF_INDEX_FILE,
    HF_MERGES_FILE,
    HF_VOCAB_FILE,
    HF_WEIGHTS_FILE,
    config_from_hf,
    convert_hf_dir,
    from_hf_state_dict,
    hf_architecture,
    load_hf_dir,
    load_hf_tokenizer,
    read_hf_config,
)
from .export import EXPORTED_BY, export_hf, hf_config, hf_tokenizer_files, to_hf_state_dict
from .fetch import (
    HF_DOWNLOAD_FILES,
    cache_dir,
    cached_model,
    canonical_name,
    check_model_spec,
    download_command,
    download_model,
    fetch_model,
    hf_snapshot,
    home_dir,
    hub_names,
    is_hub_name,
    load_model,
    resolve_model,
)
from .gguf_export import export_gguf, write_gguf
from .info import format_model_info, model_info

__all__ = [
    "EXPORTED_BY",
    "HF_DOWNLOAD_FILES",
    "HF_INDEX_FILE",
    "HF_MERGES_FILE",
    "HF_VOCAB_FILE",
    "HF_WEIGHTS_FILE",
    "cache_dir",
    "cached_model",
    "canonical_name",
    "check_model_spec",
    "config_from_hf",
    "convert_hf_dir",
    "download_command",
    "download_model",
    "export_gguf",
    "export_hf",
    "fetch_model",
    "format_model_info",
    "from_hf_state_dict",
    "hf_architecture",
    "hf_config",
    "hf_snapshot",
    "hf_tokenizer_files",
    "home_dir",
    "hub_names",
    "is_hub_name",
    "load_hf_dir",
    "load_hf_tokenizer",
    "load_model",
    "model_info",
    "read_hf_config",
    "resolve_model",
    "to_hf_state_dict",
    "write_gguf",
]
