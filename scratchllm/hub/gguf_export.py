"""Our models -> GGUF files that llama.cpp and Ollama run (`export_gguf`), written with llama.cpp's own `gguf`
package, with an Ollama Modelfile beside them (gguf_modelfile.py).

A GGUF file holds the weights under llama.cpp's tensor names, the hyperparameters its graph of the
architecture reads (`llama.rope.freq_base`, ...) and the tokenizer (gguf_tokenizer.py). What differs from
a rename of our weights:
- GPT-2: one fused `attn_qkv` with a bias (zeros for a model without one). Our layers are `nn.Linear`,
  stored (out, in), which is GGUF's layout already: nothing is transposed (HF's Conv1D weights would be).
- Llama: the rows of q and k go from the half-split rotary layout (ours, as Hugging Face's) to the
  interleaved pairs of llama.cpp's "normal" RoPE; Qwen3 and Gemma 3 run the half-split (NEOX) kind, and
  keep theirs. Llama 3's frequency scaling travels as a `rope_freqs` tensor of divisors.
- Gemma 3: the norms' weights are offsets from 1 (`1 + w`, ours and HF's); llama.cpp multiplies by the
  stored weight, so 1 is added. Its sliding layers are listed one by one, with their own RoPE base.
- Qwen3 MoE: each kind of expert matrix stacked into one 3-D tensor (`ffn_gate_exps` ...).
- A tied head is left out: llama.cpp reuses `token_embd`.
llama.cpp's graphs fix some choices that our configs leave open (Gemma's attention scale, Qwen3 MoE's
renormalized routing weights, GPT-2's tanh GELU): a config that differs is refused, naming the setting.

Weights are written as f32, f16, bf16 or q8_0 (blocks of 32 values sharing one scale). As in llama.cpp's
converter, 1-D tensors, norms, the MoE router and position embeddings stay f32, and a matrix whose rows are
not a multiple of 32 values falls back from q8_0 to f16.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
import torch.nn as nn

from ..checkpoint import LoadedModel
from ..config import setting
from ..errors import ScratchLLMError
from ..fileio import atomic_path, atomic_write_text, check_output_file
from ..model.lora import lora_layers, merge_lora
from ..model.parts import rope_inverse_frequencies
from ..model.quantize import is_quantized
from .fetch import HUB_NAMES_HELP, load_model
from .gguf_modelfile import MODELFILE, TEMPLATE_CHOICES, check_replaceable_modelfile, modelfile
from .gguf_tokenizer import gguf_vocab, write_vocab

Q = gguf.GGMLQuantizationType
# --dtype -> (the type of the quantizable matrices, the file type GGUF's header names)
DTYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# our architecture -> llama.cpp's
GGUF_ARCHITECTURES = {
    "gpt2": "gpt2",
    "llama3": "llama",
    "qwen3": "qwen3",
    "qwen3-moe": "qwen3moe",
    "gemma3": "gemma3",
}
# What llama.cpp's graph of each architecture computes, as our config's settings
_LLAMA_LIKE = dict(post_norms=False, embed_scale=False, norm_unit_offset=False, activation="silu")
REQUIRED: dict[str, dict[str, Any]] = {
    "gpt2": dict(gelu="tanh"),
    "llama": dict(_LLAMA_LIKE, qk_norm=False),
    "qwen3": dict(_LLAMA_LIKE, qk_norm=True),
    "qwen3moe": dict(_LLAMA_LIKE, qk_norm=True, norm_topk_prob=True),  # it renormalizes the chosen weights
    "gemma3": dict(
        qk_norm=True, post_norms=True, embed_scale=True, norm_unit_offset=True, activation="gelu_tanh"
    ),
}
KEEP_F32 = ("position_embd.weight", "_norm.weight", "ffn_gate_inp.weight")  # name endings never quantized
Q8_BLOCK = 32

# GPT-2's names: (ours in block i, GGUF's in blk.i)
GPT2_BLOCK = [
    ("norm1.scale", "attn_norm.weight"),
    ("norm1.shift", "attn_norm.bias"),
    ("att.qkv.weight", "attn_qkv.weight"),
    ("att.qkv.bias", "attn_qkv.bias"),
    ("att.out_proj.weight", "attn_output.weight"),
    ("att.out_proj.bias", "attn_output.bias"),
    ("norm2.scale", "ffn_norm.weight"),
    ("norm2.shift", "ffn_norm.bias"),
    ("ff.layers.0.weight", "ffn_up.weight"),
    ("ff.layers.0.bias", "ffn_up.bias"),
    ("ff.layers.2.weight", "ffn_down.weight"),
    ("ff.layers.2.bias", "ffn_down.bias"),
]
GPT2_MODEL = [
    ("tok_emb.weight", "token_embd.weight"),
    ("pos_emb.weight", "position_embd.weight"),
    ("final_norm.scale", "output_norm.weight"),
    ("final_norm.shift", "output_norm.bias"),
]
# The other families' names, where present (q, k and v are split from our fused qkv; experts are stacked)
TRANSFORMER_BLOCK = [
    ("norm1.weight", "attn_norm.weight"),
    ("att.out_proj.weight", "attn_output.weight"),
    ("att.q_norm.weight", "attn_q_norm.weight"),
    ("att.k_norm.weight", "attn_k_norm.weight"),
    ("post_att_norm.weight", "post_attention_norm.weight"),
    ("norm2.weight", "ffn_norm.weight"),
    ("post_ff_norm.weight", "post_ffw_norm.weight"),
    ("ff.gate.weight", "ffn_gate.weight"),
    ("ff.up.weight", "ffn_up.weight"),
    ("ff.down.weight", "ffn_down.weight"),
    ("ff.router.weight", "ffn_gate_inp.weight"),
]


# ----------------------------------------------------------------------------------------------
# Weights


def gguf_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our model's weights under llama.cpp's names and in its layout (in the model's dtype: `encode_tensor`
    casts one tensor at a time)."""
    arch = gguf_architecture(model.cfg)
    ours = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    tensors = (
        _gpt2_tensors(model.cfg, ours) if arch == "gpt2" else _transformer_tensors(model.cfg, ours, arch)
    )
    if not model.weights_tied:
        tensors["output.weight"] = ours["out_head.weight"]
    return {name: t.contiguous() for name, t in tensors.items()}


def _gpt2_tensors(cfg: Any, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {gguf_name: ours[name] for name, gguf_name in GPT2_MODEL}
    for i in range(cfg.n_layers):
        for name, gguf_name in GPT2_BLOCK:
            tensor = ours.get(f"trf_blocks.{i}.{name}")
            if tensor is None and name == "att.qkv.bias":  # llama.cpp's GPT-2 always adds one
                tensor = torch.zeros(3 * cfg.emb_dim)
            out[f"blk.{i}.{gguf_name}"] = tensor
    return out


def _transformer_tensors(cfg: Any, ours: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    out = {"token_embd.weight": ours["tok_emb.weight"], "output_norm.weight": ours["final_norm.weight"]}
    kv = cfg.n_kv_groups * cfg.head_dim
    for i in range(cfg.n_layers):
        block, blk = f"trf_blocks.{i}.", f"blk.{i}."
        out |= {
            blk + theirs: ours[block + name] for name, theirs in TRANSFORMER_BLOCK if block + name in ours
        }
        for kind in ("weight", "bias"):
            fused = ours.get(f"{block}att.qkv.{kind}")
            if fused is None:
                continue
            q, k, v = fused.split([cfg.n_heads * cfg.head_dim, kv, kv])
            if arch == "llama":
                q, k = interleave_rope_rows(q, cfg.n_heads), interleave_rope_rows(k, cfg.n_kv_groups)
            out |= {f"{blk}attn_q.{kind}": q, f"{blk}attn_k.{kind}": k, f"{blk}attn_v.{kind}": v}
        for part in ("gate", "up", "down") if cfg.n_experts else ():
            experts = [ours[f"{block}ff.experts.{e}.{part}.weight"] for e in range(cfg.n_experts)]
            out[f"{blk}ffn_{part}_exps.weight"] = torch.stack(experts)
    if cfg.norm_unit_offset:
        out = {name: t.float() + 1.0 if name.endswith("norm.weight") else t for name, t in out.items()}
    if cfg.rope_scaling and cfg.rope_scaling["type"] == "llama3":
        plain = rope_inverse_frequencies(cfg.head_dim, cfg.rope_base)
        out["rope_freqs.weight"] = plain / rope_inverse_frequencies(
            cfg.head_dim, cfg.rope_base, cfg.rope_scaling
        )
    return out


def interleave_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """A q or k projection's rows (per head: the first halves of the rotated pairs, then the second halves)
    reordered so that each pair's two rows are neighbours, as llama.cpp's normal RoPE rotates them."""
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def encode_tensor(name: str, tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, Q]:
    """A tensor as GGUF stores it: (data, type). Vectors, norms, the router and position embeddings stay
    f32; q8_0 needs rows of a multiple of 32 values, else f16."""
    qtype = DTYPES[dtype][0]
    if tensor.dim() < 2 or not name.endswith(".weight") or name.endswith(KEEP_F32):
        qtype = Q.F32
    if qtype == Q.Q8_0 and tensor.shape[-1] % Q8_BLOCK:
        qtype = Q.F16
    data = tensor.float().numpy()
    if qtype == Q.F32:
        return data.astype(np.float32), qtype
    if qtype == Q.F16:
        return data.astype(np.float16), qtype
    return gguf.quantize(data, qtype), qtype


# ----------------------------------------------------------------------------------------------
# Hyperparameters


def gguf_architecture(cfg: Any) -> str:
    """llama.cpp's name for our config's architecture; an error naming every setting its graph lacks."""
    arch = GGUF_ARCHITECTURES.get(cfg.architecture)
    if arch is None:
        raise ScratchLLMError(f"model architecture {cfg.architecture!r} has no GGUF export")
    if cfg.n_classes:
        raise ScratchLLMError(
            f"this model is a classifier ({cfg.n_classes} classes), not a language model; llama.cpp runs "
            "language models only"
        )
    problems = [
        f"{key} {getattr(cfg, key)!r} (llama.cpp's {arch}: {want!r})"
        for key, want in REQUIRED[arch].items()
        if getattr(cfg, key) != want
    ]
    if arch != "gpt2":
        problems += _transformer_problems(cfg, arch)
    if problems:
        raise ScratchLLMError(f"llama.cpp's {arch} graph cannot run this model: {'; '.join(problems)}")
    return arch


def _transformer_problems(cfg: Any, arch: str) -> list[str]:
    problems = []
    if (arch == "qwen3moe") != bool(cfg.n_experts):
        problems.append(
            f"n_experts {cfg.n_experts} (llama.cpp's {arch}: {'> 0' if arch == 'qwen3moe' else 0})"
        )
    if arch != "gemma3" and "sliding" in [cfg.layer_type(i) for i in range(cfg.n_layers)]:
        problems.append("sliding-window layers (llama.cpp's gemma3 has them)")
    scaling = (cfg.rope_scaling or {}).get("type")
    if scaling == "llama3" and arch != "llama":
        problems.append("llama3 RoPE scaling (llama.cpp's llama has it)")
    if arch == "gemma3":
        scale = cfg.emb_dim // cfg.n_heads if cfg.n_layers == 62 else cfg.head_dim  # Gemma 3 27B's rule
        if cfg.query_scale not in (0, scale):
            problems.append(f"query_scale {cfg.query_scale} (llama.cpp's gemma3: {scale})")
    elif cfg.query_scale not in (0, cfg.head_dim):
        problems.append(f"query_scale {cfg.query_scale} (llama.cpp's {arch}: head_dim, {cfg.head_dim})")
    return problems


def write_hyperparameters(writer: gguf.GGUFWriter, cfg: Any, arch: str) -> None:
    """The `{arch}.*` keys llama.cpp reads for the architecture."""
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.emb_dim)
    writer.add_head_count(cfg.n_heads)
    if arch == "gpt2":
        writer.add_feed_forward_length(4 * cfg.emb_dim)
        writer.add_layer_norm_eps(1e-5)
        return
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count_kv(cfg.n_kv_groups)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_freq_base(cfg.rope_base)
    if cfg.rope_scaling and cfg.rope_scaling["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling["factor"])
    if cfg.n_experts:
        writer.add_expert_count(cfg.n_experts)
        writer.add_expert_used_count(cfg.n_experts_per_tok)
        writer.add_expert_feed_forward_length(cfg.moe_hidden_dim)
    sliding = [cfg.layer_type(i) == "sliding" for i in range(cfg.n_layers)]
    if arch == "gemma3" and any(sliding):
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern(sliding)
        writer.add_rope_freq_base_swa(cfg.rope_local_base or cfg.rope_base)


# ----------------------------------------------------------------------------------------------
# The file


@dataclass
class GGUFExport:
    """What `write_gguf` wrote: the file, its Modelfile, the type of each tensor, and notes for people."""

    path: Path
    modelfile: Path
    types: dict[str, str] = field(default_factory=dict)  # tensor name -> GGML type name
    notes: list[str] = field(default_factory=list)


def export_gguf(
    spec: str | os.PathLike | LoadedModel, out: str | os.PathLike, dtype: str = "f16", template: str = "auto"
) -> Path:
    """Write a model (a directory, hub name or loaded model) as one GGUF file for llama.cpp, with an Ollama
    `Modelfile` beside it. `dtype`: f32, f16, bf16 or q8_0 for the matrices. `template`: the Modelfile's
    prompt template (gguf_modelfile.modelfile). Atomic: `out` appears complete or not at all."""
    return write_gguf(spec, out, dtype, template).path


def write_gguf(
    spec: str | os.PathLike | LoadedModel, out: str | os.PathLike, dtype: str = "f16", template: str = "auto"
) -> GGUFExport:
    """`export_gguf`, saying what it wrote (`GGUFExport`)."""
    if dtype not in DTYPES:
        raise ScratchLLMError(f"unknown GGUF --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out).expanduser()
    check_output_file(out, "OUT", writable=True)
    modelfile_path = out.parent / MODELFILE
    check_replaceable_modelfile(modelfile_path)
    loaded = spec if isinstance(spec, LoadedModel) else load_model(spec)
    model = _plain_model(loaded.model)
    arch = gguf_architecture(model.cfg)
    vocab = gguf_vocab(loaded.tokenizer)  # before the weights: a tokenizer GGUF cannot hold fails fast
    described = modelfile(out.name, loaded.tokenizer, loaded.extra, template)
    result = GGUFExport(out, modelfile_path)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(loaded.path.name if loaded.path is not None else arch)
        writer.add_file_type(DTYPES[dtype][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hyperparameters(writer, model.cfg, arch)
        write_vocab(writer, vocab, model.cfg.vocab_size)
        if described.chat_template:
            writer.add_chat_template(described.chat_template)
        for name, tensor in gguf_tensors(model).items():
            data, qtype = encode_tensor(name, tensor, dtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
            result.types[name] = qtype.name
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    atomic_write_text(modelfile_path, described.text)
    fallback = [n for n, t in result.types.items() if dtype == "q8_0" and t == "F16"]
    if fallback:
        result.notes.append(
            f"q8_0 needs rows of a multiple of {Q8_BLOCK} values: f16 for {', '.join(fallback)}"
        )
    result.notes.append(described.note)
    return result


def _plain_model(model: nn.Module) -> nn.Module:
    """The model with LoRA adapters folded into a copy (llama.cpp has no place for them); int4 refused."""
    if is_quantized(model):
        raise ScratchLLMError(
            "a quantized model cannot be exported (int8 and int4 are for inference); export the original"
        )
    if lora_layers(model):
        model = copy.deepcopy(model)
        merge_lora(model)
    return model


@dataclass
class ExportGGUFSettings:
    """`scratchllm export-gguf`: a model written as one GGUF file (llama.cpp, Ollama) and a Modelfile."""

    model: str = setting("", f"a model directory, or {HUB_NAMES_HELP}", "model", positional=True)
    out: str = setting("", "the .gguf file to write (its Modelfile goes beside it)", "model", positional=True)
    dtype: str = setting(
        "f16", "the matrices' type (vectors and norms stay f32)", "model", choices=tuple(DTYPES)
    )
    template: str = setting(
        "auto",
        "the Modelfile's (and the file's chat) template: auto (the one the model was finetuned with, else "
        "its chat template, else none), a book template, model (the tokenizer's own) or none (raw prompts)",
        "model",
        choices=TEMPLATE_CHOICES,
    )


def export_gguf_command(settings: ExportGGUFSettings) -> None:
    """`write_gguf`, and what it wrote."""
    if not settings.model or not settings.out:
        raise ScratchLLMError("export-gguf needs a model and the file to write: export-gguf MODEL OUT.gguf")
    result = write_gguf(settings.model, settings.out, settings.dtype, settings.template)
    counts = Counter(result.types.values())
    mb = result.path.stat().st_size / 1e6
    kinds = ", ".join(f"{n} {t.lower()}" for t, n in counts.most_common())
    print(f"wrote {result.path} ({mb:.1f} MB; tensors: {kinds}) and {result.modelfile}")
    for note in result.notes:
        print(f"  {note}")
    print(f"next: llama-cli -m {result.path}   or   ollama create NAME -f {result.modelfile}")
