"""GPT-2 in Hugging Face's form (`GPT2LMHeadModel`): weight names, tensors and config, both ways.

The conversion is one explicit name table. Two things differ from a plain rename: GPT-2's
projections are `Conv1D` layers whose weight is stored (in, out), the transpose of `nn.Linear`'s
(out, in); and the output head is tied to the token embedding, so HF's files usually leave
`lm_head.weight` out. GPT-2 already fuses q/k/v into one `c_attn` projection, like our `att.qkv`.
This module maps names, tensors and settings; hub/ reads and writes the files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from ..errors import ScratchLLMError
from .gpt import GPTConfig

MODEL_TYPE = "gpt2"  # config.json's model_type
HF_CLASS = "GPT2LMHeadModel"
# Hub name (a preset) -> its Hugging Face repository
REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}

# The name table: (our name, HF name, HF stores the transpose). Per block, then the rest.
BLOCK_NAMES = [
    ("norm1.scale", "ln_1.weight", False),
    ("norm1.shift", "ln_1.bias", False),
    ("att.qkv.weight", "attn.c_attn.weight", True),  # Conv1D (d, 3d) = [q | k | v] columns
    ("att.qkv.bias", "attn.c_attn.bias", False),
    ("att.out_proj.weight", "attn.c_proj.weight", True),
    ("att.out_proj.bias", "attn.c_proj.bias", False),
    ("norm2.scale", "ln_2.weight", False),
    ("norm2.shift", "ln_2.bias", False),
    ("ff.layers.0.weight", "mlp.c_fc.weight", True),
    ("ff.layers.0.bias", "mlp.c_fc.bias", False),
    ("ff.layers.2.weight", "mlp.c_proj.weight", True),
    ("ff.layers.2.bias", "mlp.c_proj.bias", False),
]
MODEL_NAMES = [
    ("tok_emb.weight", "wte.weight", False),
    ("pos_emb.weight", "wpe.weight", False),
    ("final_norm.scale", "ln_f.weight", False),
    ("final_norm.shift", "ln_f.bias", False),
]
HF_HEAD = "lm_head.weight"  # an nn.Linear in HF too: no transpose
HF_PREFIX = "transformer."  # save_pretrained writes it; OpenAI's files on the hub have none
# GPT-2's causal-mask buffers, saved by old transformers versions: not weights
HF_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
# transformers' activation_function names -> our GPTConfig.gelu (tanh: gelu_new is GPT-2's; exact: erf)
HF_GELUS = {
    "gelu_new": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_fast": "tanh",
    "gelu": "exact",
    "gelu_python": "exact",
}


def name_table(n_layers: int) -> list[tuple[str, str, bool]]:
    """(our name, HF name without the `transformer.` prefix, transposed) for every weight but the head."""
    table = list(MODEL_NAMES)
    for i in range(n_layers):
        table += [(f"trf_blocks.{i}.{ours}", f"h.{i}.{hf}", t) for ours, hf, t in BLOCK_NAMES]
    return table


def is_buffer(name: str) -> bool:
    """An HF tensor that is no weight (a saved attention mask): conversion drops it."""
    return HF_BUFFER.fullmatch(name.removeprefix(HF_PREFIX)) is not None


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> GPTConfig:
    """Our GPTConfig for a Hugging Face GPT-2 config; an error for settings our model lacks."""
    try:
        d, n_layers, n_heads, vocab = (int(hf[k]) for k in ("n_embd", "n_layer", "n_head", "vocab_size"))
        context = int(hf.get("n_positions") or hf["n_ctx"])
    except (KeyError, TypeError, ValueError) as e:
        raise ScratchLLMError(f"{source}: missing or bad GPT-2 setting {e}") from e
    activation = hf.get("activation_function", "gelu_new")
    unsupported = _unsupported_settings(hf, d, activation)
    if unsupported:
        raise ScratchLLMError(f"{source}: settings this GPT cannot represent: {'; '.join(unsupported)}")
    drop_rate = hf.get("resid_pdrop", 0.1)
    try:
        return GPTConfig(
            vocab_size=vocab,
            context_length=context,
            emb_dim=d,
            n_heads=n_heads,
            n_layers=n_layers,
            drop_rate=float(drop_rate if drop_rate is not None else 0.0),  # null: no dropout
            qkv_bias=True,  # GPT-2's c_attn always has a bias
            tie_weights=bool(hf.get("tie_word_embeddings", True)),
            gelu=HF_GELUS[activation],
        )
    except (ScratchLLMError, TypeError, ValueError) as e:  # e.g. n_head does not divide n_embd
        raise ScratchLLMError(f"{source}: {e}") from e


def _unsupported_settings(hf: Mapping[str, Any], d: int, activation: Any) -> list[str]:
    """The settings of a GPT-2 config that our GPTModel cannot represent, described."""
    unsupported = []
    if not isinstance(activation, str) or activation not in HF_GELUS:
        unsupported.append(f"activation_function {activation!r} (ours: gelu_new or gelu)")
    epsilon = hf.get("layer_norm_epsilon", 1e-5)
    if not isinstance(epsilon, (int, float)) or abs(epsilon - 1e-5) > 1e-12:
        unsupported.append(f"layer_norm_epsilon {epsilon!r} (ours: 1e-5)")
    if hf.get("n_inner") not in (None, 4 * d):
        unsupported.append(f"n_inner {hf['n_inner']} (ours: 4 * n_embd = {4 * d})")
    if not hf.get("scale_attn_weights", True):
        unsupported.append("scale_attn_weights false")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        unsupported.append("scale_attn_by_inverse_layer_idx true")
    if hf.get("add_cross_attention", False):
        unsupported.append("add_cross_attention true")
    return unsupported


def config_to_hf(cfg: GPTConfig, eot_id: int | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """A `GPT2Config` dict for our config; `eot_id`: the tokenizer's <|endoftext|> id (bos and eos)."""
    return {
        "architectures": [HF_CLASS],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,  # the name old transformers versions read
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new" if cfg.gelu == "tanh" else "gelu",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def from_hf_state_dict(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    cfg: GPTConfig,
    source: str = "Hugging Face weights",
) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 tensors (name -> tensor, or pairs read one at a time) -> ours by name.
    Missing tensors and wrong shapes are left for `load_state_dict_strict` to report."""
    table = {hf: (ours, t) for ours, hf, t in name_table(cfg.n_layers)}
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    out: dict[str, torch.Tensor] = {}
    head = None
    unknown = []
    for key, tensor in items:
        name = key.removeprefix(HF_PREFIX)
        if HF_BUFFER.fullmatch(name):
            continue
        if name == HF_HEAD:
            head = tensor
        elif name in table:
            ours, transposed = table[name]
            out[ours] = tensor.t().contiguous() if transposed and tensor.dim() == 2 else tensor
        else:
            unknown.append(key)
    if unknown:
        raise ScratchLLMError(
            f"{source}: tensors that are not part of a GPT-2 language model: {', '.join(unknown[:5])}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        )
    if head is not None:
        if not cfg.tie_weights:
            out["out_head.weight"] = head
        elif "tok_emb.weight" in out and not torch.equal(head, out["tok_emb.weight"]):
            raise ScratchLLMError(
                f"{source}: config.json ties the head (tie_word_embeddings true) but lm_head.weight differs "
                "from wte.weight; set tie_word_embeddings to false to keep a separate head"
            )
    return out


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our GPT-2-shaped language model -> `GPT2LMHeadModel` tensors (prefixed names, Conv1D layout).
    A model without q/k/v biases gets zero ones; an untied head is written as lm_head.weight."""
    cfg = model.cfg
    if cfg.n_classes:
        raise ScratchLLMError(
            f"this model is a classifier ({cfg.n_classes} classes), not a language model: GPT-2's Hugging "
            "Face format has no place for its head (GPT2ForSequenceClassification has no head bias)"
        )
    ours = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    out = {}
    for name, hf, transposed in name_table(cfg.n_layers):
        if name not in ours and name.endswith("att.qkv.bias"):
            tensor = torch.zeros(3 * cfg.emb_dim, dtype=ours["tok_emb.weight"].dtype)
        else:
            tensor = ours[name]
        out[HF_PREFIX + hf] = (tensor.t() if transposed else tensor).contiguous()
    if not model.weights_tied:
        out[HF_HEAD] = ours["out_head.weight"].contiguous()
    return out
