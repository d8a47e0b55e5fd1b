"""Our models -> Hugging Face directories that `transformers` loads (`export_hf`)."""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import __version__
from ..checkpoint import LoadedModel, write_error, write_weights
from ..config import setting
from ..errors import ScratchLLMError
from ..fileio import CONFIG_FILE, atomic_dir, atomic_write_json, directory_kind
from ..model.lora import lora_layers, merge_lora
from ..model.quantize import is_quantized
from ..text.bpe import ENCODER_FILE, GPT2_PATTERN, MERGES_FILE, BPETokenizer
from ..text.hf_tokenizer import HFTokenizer
from ..text.tokenizer import EOT, Tokenizer
from .convert import HF_MERGES_FILE, HF_VOCAB_FILE, HF_WEIGHTS_FILE, hf_mapping
from .fetch import HUB_NAMES_HELP, load_model

EXPORTED_BY = "exported_by"  # in config.json: the mark of a directory `export_hf` wrote, which it may replace


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our model -> the tensors of its family's Hugging Face model (e.g. `GPT2LMHeadModel`)."""
    return hf_mapping(model.cfg).to_hf_state_dict(model)


def hf_config(cfg: Any, tokenizer: Tokenizer | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """The Hugging Face config.json for our config (e.g. a `GPT2Config` dict), marked as exported."""
    eot = tokenizer.eot_id if tokenizer is not None else None
    config = hf_mapping(cfg).config_to_hf(cfg, eot, dtype)
    if isinstance(tokenizer, HFTokenizer):
        config |= {"bos_token_id": tokenizer.bos_id, "pad_token_id": tokenizer.pad_id}
    return {**config, EXPORTED_BY: f"scratchllm {__version__}"}


def hf_tokenizer_files(tokenizer: Tokenizer, context_length: int) -> dict[str, bytes] | None:
    """The tokenizer's files for transformers: a model's own tokenizer.json and tokenizer_config.json
    (with its chat template; generation_config.json with its end-of-turn ids), or for a GPT-2-style BPE
    vocab.json, merges.txt and tokenizer_config.json for `GPT2TokenizerFast`; None for other kinds (HF's
    GPT-2 tokenizer has GPT-2's split pattern built in)."""
    if isinstance(tokenizer, HFTokenizer):
        files = dict(tokenizer._files())
        if tokenizer.stop_ids:
            generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.stop_ids}
            files["generation_config.json"] = (json.dumps(generation, indent=2) + "\n").encode("utf-8")
        return files
    if not isinstance(tokenizer, BPETokenizer) or tokenizer.pattern != GPT2_PATTERN:
        return None
    files = tokenizer._files()
    eot = EOT if EOT in tokenizer.special_tokens else None
    special = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": context_length,
        "add_prefix_space": False,
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "added_tokens_decoder": {
            str(i): {"content": s, **special}
            for s, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
        },
    }
    return {
        HF_VOCAB_FILE: files[ENCODER_FILE],
        HF_MERGES_FILE: files[MERGES_FILE],
        "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
    }


def _check_export_target(out: Path) -> None:
    """An export replaces its output directory as a whole, so an existing Hugging Face model there must
    be one that `export_hf` wrote: another (the user's download, a different architecture) has files
    that would be lost."""
    if directory_kind(out) != "Hugging Face model directory":
        return  # new, empty, or another kind: atomic_dir's checks say what to do
    config = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
    if EXPORTED_BY not in config:
        raise ScratchLLMError(
            f"{out} is a Hugging Face model directory that this export-hf did not write (its config.json has "
            f"no {EXPORTED_BY!r}: another program's, or an export by scratchllm before 2026-11-28); the "
            "export would replace it as a whole, so give a new or empty directory (or delete it first)"
        )


def export_hf(spec: str | os.PathLike | LoadedModel, out: str | os.PathLike) -> Path:
    """Write a model (a directory, hub name or loaded model) as a Hugging Face directory: config.json,
    model.safetensors and the tokenizer files (`hf_tokenizer_files`). Atomic: `out` appears complete or
    not at all."""
    loaded = spec if isinstance(spec, LoadedModel) else load_model(spec)
    model, tokenizer = loaded.model, loaded.tokenizer
    if is_quantized(model):
        raise ScratchLLMError(
            "a quantized model cannot be exported (it is for inference); export the original"
        )
    if lora_layers(model):  # Hugging Face's models have no place for adapters: they fold into a copy
        model = copy.deepcopy(model)
        merge_lora(model)
    tensors = to_hf_state_dict(model)
    out = Path(out)
    _check_export_target(out)
    sources = [loaded.path] if loaded.path is not None else []
    existed = (out / CONFIG_FILE).is_file()
    what = "Hugging Face model directory"
    try:
        with atomic_dir(out, marker=CONFIG_FILE, what=what, inside=sources) as tmp:
            write_weights(tensors, tmp / HF_WEIGHTS_FILE)
            atomic_write_json(tmp / CONFIG_FILE, hf_config(model.cfg, tokenizer, model.tok_emb.weight.dtype))
            files = hf_tokenizer_files(tokenizer, model.cfg.context_length) if tokenizer is not None else None
            for fname, data in (files or {}).items():
                (tmp / fname).write_bytes(data)
    except OSError as e:
        raise write_error(out, what, e, existed) from e
    if files is None:  # else transformers' AutoTokenizer would load an empty GPT-2 tokenizer from `out`
        why = (
            "the model has no tokenizer"
            if tokenizer is None
            else f"its {tokenizer.kind} tokenizer has no GPT-2 form"  # nor another Hugging Face one
        )
        warnings.warn(
            f"{out} holds the weights and config only ({why}); encode text for it with scratchllm's "
            "tokenizer",
            stacklevel=2,
        )
    return out


@dataclass
class ExportHFSettings:
    """`scratchllm export-hf`: a model written as a Hugging Face directory (transformers loads it)."""

    model: str = setting("", f"a model directory, or {HUB_NAMES_HELP}", "model", positional=True)
    out: str = setting("", "the directory to write", "model", positional=True)


def export_hf_command(settings: ExportHFSettings) -> None:
    """`export_hf`, and a line saying where it wrote."""
    if not settings.model or not settings.out:
        raise ScratchLLMError("export-hf needs a model and the directory to write: export-hf MODEL OUT")
    print(f"wrote a Hugging Face directory to {export_hf(settings.model, settings.out)}")
