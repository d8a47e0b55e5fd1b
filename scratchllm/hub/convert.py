"""A Hugging Face model directory -> a model directory: config, weights (read with safetensors only,
one tensor at a time, shards too) and the tokenizer (GPT-2's files, or the model's own tokenizer.json
with its chat template). The name tables live with each family in model/ (model/gpt2_hf.py,
model/transformer_hf.py); `config.json`'s model_type picks the family through the registry."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..checkpoint import check_finite, load_state_dict_strict, meta_model, save_model
from ..errors import ScratchLLMError
from ..fileio import CONFIG_FILE, check_replaceable, directory_kind
from ..model.registry import Architecture, HFMapping, get_architecture, hf_architectures, preset_config
from ..text.bpe import BPETokenizer, read_encoder_files
from ..text.hf_tokenizer import HFTokenizer
from ..text.tokenizer import Tokenizer

HF_WEIGHTS_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"
HF_VOCAB_FILE = "vocab.json"
HF_MERGES_FILE = "merges.txt"
HF_TOKENIZER_FILE = "tokenizer.json"


def hf_architecture(model_type: Any, source: str = "config.json") -> Architecture:
    """The registered family whose Hugging Face model_type is `model_type`."""
    for arch in hf_architectures():
        if arch.hf.model_type == model_type:
            return arch
    known = ", ".join(f'{a.hf.label} ("{a.hf.model_type}")' for a in hf_architectures())
    raise ScratchLLMError(f"{source}: model_type is {model_type!r}; only {known} converts")


def hf_mapping(cfg: Any) -> HFMapping:
    """The Hugging Face mapping of `cfg`'s family; an error for a family without one."""
    arch = get_architecture(cfg.architecture)
    if arch.hf is None:
        raise ScratchLLMError(f"model architecture {arch.name!r} has no Hugging Face form")
    return arch.hf


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> Any:
    """Our config for a Hugging Face config.json; an error for settings our model lacks."""
    return hf_architecture(hf.get("model_type"), source).hf.config_from_hf(hf, source)


def from_hf_state_dict(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    cfg: Any,
    source: str = "Hugging Face weights",
) -> dict[str, torch.Tensor]:
    """Hugging Face tensors (name -> tensor, or pairs read one at a time) -> ours by name, for `cfg`'s
    family. Missing tensors and wrong shapes are left for `load_state_dict_strict` to report."""
    return hf_mapping(cfg).from_hf_state_dict(tensors, cfg, source)


def convert_hf_dir(src: str | os.PathLike, out: str | os.PathLike, expect: str | None = None) -> Path:
    """Convert a Hugging Face directory (config.json, model.safetensors, optionally vocab.json +
    merges.txt) into a model directory at `out`. With `expect` (a hub name), the config must be that
    preset's (dropout aside), so the cache never holds a wrong model under a name."""
    if expect is not None:
        want, got = preset_config(expect).to_dict(), read_hf_config(src).to_dict()
        diff = [
            f"{k} {got[k]} (expected {want[k]})" for k in want if k != "drop_rate" and got.get(k) != want[k]
        ]
        if diff:
            raise ScratchLLMError(
                f"{src} does not hold {expect}: {', '.join(diff)}; pick the matching size (--size), or write "
                "another shape to a directory of your own (--out DIR)"
            )
    check_replaceable(out, CONFIG_FILE, "model directory", inside=[Path(src)])  # before reading src
    model, tokenizer = load_hf_dir(src)
    return save_model(out, model, tokenizer)


def read_hf_config(src: str | os.PathLike) -> Any:
    """Our config for the config.json of a Hugging Face directory."""
    src = Path(src).expanduser()
    if not src.is_dir():
        raise ScratchLLMError(f"{src} is not a directory; give a Hugging Face model directory")
    if directory_kind(src) in ("model directory", "checkpoint"):
        raise ScratchLLMError(
            f"{src} is a scratchllm model directory already, nothing to convert; use it as it is (--model "
            f"{src})"
        )
    return config_from_hf(_read_json(src / CONFIG_FILE), source=str(src / CONFIG_FILE))


def load_hf_dir(src: str | os.PathLike) -> tuple[torch.nn.Module, Tokenizer | None]:
    """Our model (eval mode) and tokenizer (None without vocab.json + merges.txt) from a Hugging
    Face directory, read with safetensors only."""
    src = Path(src).expanduser()
    cfg = read_hf_config(src)
    model = meta_model(cfg)
    pairs = _iter_hf_tensors(src, hf_mapping(cfg).is_buffer)
    tensors = from_hf_state_dict(pairs, cfg, source=str(src))
    load_state_dict_strict(model, tensors, source=f"{src} (converted from Hugging Face names)", assign=True)
    model.eval()
    return model, load_hf_tokenizer(src, gpt2_files_first=cfg.architecture == "gpt2")


def _hf_weight_files(src: Path) -> list[Path]:
    """The safetensors files of a HF directory: one, or the shards its index lists."""
    index = src / HF_INDEX_FILE
    if (src / HF_WEIGHTS_FILE).is_file():
        return [src / HF_WEIGHTS_FILE]
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ScratchLLMError(f'{index}: no "weight_map" object')
        return [src / f for f in sorted(set(weight_map.values()))]
    other = [p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".h5", ".msgpack")]
    found = (
        f" (found {', '.join(other)}: pickled or other formats are not loaded, for safety)" if other else ""
    )
    raise ScratchLLMError(
        f"{src}: no {HF_WEIGHTS_FILE}{found}; save it with transformers' save_pretrained(..., "
        "safe_serialization=True)"
    )


def _iter_hf_tensors(src: Path, is_buffer: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a HF directory's safetensors weights (one file or shards), one at a time,
    so a conversion holds one copy of the model plus one tensor. `is_buffer`: names that are no
    weights (dropped by the conversion, so not checked)."""
    for path in _hf_weight_files(src):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    tensor = f.get_tensor(name)
                    if not is_buffer(name):
                        check_finite(name, tensor, path)
                    yield name, tensor
        except SafetensorError as e:
            raise ScratchLLMError(
                f"{path}: not a readable safetensors file, probably truncated or corrupt ({e})"
            ) from e
        except FileNotFoundError as e:
            raise ScratchLLMError(f"{path} is missing (listed in {HF_INDEX_FILE})") from e


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ScratchLLMError(
            f"{path} is missing; a Hugging Face model directory has config.json and model.safetensors"
        ) from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScratchLLMError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise ScratchLLMError(f"{path}: expected a JSON object")
    return doc


def load_hf_tokenizer(src: str | os.PathLike, gpt2_files_first: bool = True) -> Tokenizer | None:
    """The tokenizer of a HF directory, or None when it has none: its `tokenizer.json` (through the
    `tokenizers` library, with its special tokens and chat template), or GPT-2-style files (vocab.json
    + merges.txt: the formats of OpenAI's encoder.json + vocab.bpe under other names), which
    `gpt2_files_first` prefers (GPT-2's own encode through tiktoken, faster; other families' vocab.json
    lacks their split pattern and special tokens)."""
    src = Path(src)
    vocab, merges = src / HF_VOCAB_FILE, src / HF_MERGES_FILE
    gpt2_files = vocab.is_file() and merges.is_file()
    if (src / HF_TOKENIZER_FILE).is_file() and not (gpt2_files and gpt2_files_first):
        return HFTokenizer.from_dir(src)
    if not gpt2_files:
        return None
    ranks, specials, merge_list = read_encoder_files(vocab, merges)
    # GPT-2's own, or another BPE in its format (one exported from here): named by its size then
    size = len(ranks) + len(specials)
    name = "gpt2" if size == 50257 else f"bpe-{size}"
    return BPETokenizer(ranks, pattern="gpt2", special_tokens=specials, name=name, merges=merge_list)
