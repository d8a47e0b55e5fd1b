"""OpenAI's GPT-2 weights in and out: Hugging Face format <-> this project's model directories.

- `fetch_model("gpt2")`: the converted model directory in the cache, downloaded and converted on
  first use (`$SCRATCHLLM_HOME/models/NAME`, default `~/.cache/scratchllm/models/NAME`).
- `download_gpt2`: fetch `openai-community/gpt2[-medium|-large|-xl]` through huggingface_hub (its
  cache, resume, progress bar; `HF_HUB_OFFLINE` respected) and convert it; `convert_hf_dir` does
  the conversion alone, for a local copy and without a network.
- `export_hf`: a model directory -> a directory `transformers.GPT2LMHeadModel.from_pretrained`
  (and `GPT2TokenizerFast`) loads.

The conversion is one explicit name table. Two things differ from a plain rename: GPT-2's
projections are `Conv1D` layers whose weight is stored (in, out), the transpose of `nn.Linear`'s
(out, in); and the output head is tied to the token embedding, so HF's files usually leave
`lm_head.weight` out. GPT-2 already fuses q/k/v into one `c_attn` projection, like our `att.qkv`.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import (
    CONFIG_FILE,
    LoadedModel,
    check_finite,
    load_model,
    load_state_dict_strict,
    meta_model,
    model_tensors,
    save_model,
    write_error,
    write_weights,
)
from .errors import ScratchLLMError
from .fileio import atomic_dir, atomic_write_json, check_replaceable, directory_kind
from .model.gpt import PRESET_ALIASES, GPTConfig, GPTModel, preset_config
from .text.tokenizer import EOT, Tokenizer

# Hub name -> Hugging Face repository. `gpt2` and the sizes (`124M`, ...) are aliases (PRESET_ALIASES).
HF_REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
SIZES = {"124M": "gpt2-small", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}
HUB_NAMES = ("gpt2", *HF_REPOS, *SIZES)
# What a download fetches: the weights (one file, or shards with an index), the config, the tokenizer.
HF_DOWNLOAD_FILES = [
    CONFIG_FILE,
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "vocab.json",
    "merges.txt",
]
HF_WEIGHTS_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"
HF_VOCAB_FILE = "vocab.json"
HF_MERGES_FILE = "merges.txt"

# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Hub names and the cache


def canonical_name(name: str) -> str:
    """`gpt2`, `124M`, `gpt2-small` -> `gpt2-small`, etc."""
    key = PRESET_ALIASES.get(name, name)
    if key not in HF_REPOS:
        raise ScratchLLMError(f"unknown GPT-2 model {name!r}; choose one of {', '.join(HUB_NAMES)}")
    return key


def is_hub_name(name: str) -> bool:
    return name in HUB_NAMES


def home_dir() -> Path:
    """scratchllm's own cache: `$SCRATCHLLM_HOME`, default `~/.cache/scratchllm`."""
    env = os.environ.get("SCRATCHLLM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "scratchllm"


def cache_dir(name: str) -> Path:
    """Where the converted model directory of a hub name lives."""
    return home_dir() / "models" / canonical_name(name)


def cached_model(name: str) -> Path | None:
    """The converted model directory of a hub name if it is in the cache, else None."""
    path = cache_dir(name)
    return path if (path / CONFIG_FILE).is_file() else None


def fetch_model(name: str, progress: bool = True) -> Path:
    """The model directory of a hub name: from the cache, else downloaded and converted now."""
    return cached_model(name) or download_gpt2(name, progress=progress)


# ----------------------------------------------------------------------------------------------
# Download


def download_gpt2(name: str = "gpt2", out: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Fetch OpenAI's GPT-2 (`gpt2`, `gpt2-medium`, ..., or `124M`, ...) from the Hugging Face
    hub and convert it into a model directory (default: the cache, see `cache_dir`)."""
    key = canonical_name(name)
    snapshot = hf_snapshot(HF_REPOS[key], progress=progress, name="gpt2" if key == "gpt2-small" else key)
    return convert_hf_dir(snapshot, out if out is not None else cache_dir(key), expect=key)


def download_command(
    name: str = "gpt2",
    size: str | None = None,
    out: str | os.PathLike | None = None,
    src: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """`scratchllm download`: `name` (`gpt2` or a sized name) and `size` (`124M`, ...) pick the model;
    `src` converts a local Hugging Face directory instead of downloading. Returns the model directory."""
    key = canonical_name(name)
    if size is not None:
        if size not in SIZES:
            raise ScratchLLMError(f"unknown GPT-2 size {size!r}; choose one of {', '.join(SIZES)}")
        if name != "gpt2" and key != SIZES[size]:
            raise ScratchLLMError(f"{name} is not the {size} model ({SIZES[size]}); give one of the two")
        key = SIZES[size]
    if src is None:
        return download_gpt2(key, out, progress=progress)
    if out is not None:  # any GPT-2 shape converts to a directory of the user's choosing
        return convert_hf_dir(src, out)
    return convert_hf_dir(src, cache_dir(key), expect=key)


def hf_snapshot(repo_id: str, progress: bool = True, name: str = "gpt2") -> Path:
    """The local snapshot directory of `repo_id` with the files in `HF_DOWNLOAD_FILES`: what is
    already in huggingface_hub's cache, the rest downloaded (resumable). The only network call of
    this module; with HF_HUB_OFFLINE set, the cache alone. `name`: the hub name errors advise."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    if not progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    retry = "unset HF_HUB_OFFLINE, connect to the network" if offline else "connect to the network"
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HF_DOWNLOAD_FILES, local_files_only=offline))
    except Exception as e:  # no network, offline mode, a proxy, an HTTP error: all "cannot get it now"
        reason = "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache" if offline else _one_line(e)
        raise ScratchLLMError(
            f"cannot download {repo_id} from the Hugging Face hub ({reason}). To fix: {retry} and try again, "
            "or convert a local copy (a directory with config.json, model.safetensors, vocab.json, merges.txt) "
            f"with `scratchllm download {name} --from DIR`"
        ) from e
    # the cache can hold part of a repository (a config fetched alone): offline, that is all there is
    if not (path / CONFIG_FILE).is_file() or not any(
        (path / f).is_file() for f in (HF_WEIGHTS_FILE, HF_INDEX_FILE)
    ):
        raise ScratchLLMError(
            f"the Hugging Face cache holds only part of {repo_id} ({path}); {retry} and run "
            f"`scratchllm download {name}` again"
        )
    return path


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ----------------------------------------------------------------------------------------------
# Hugging Face format -> ours


def convert_hf_dir(src: str | os.PathLike, out: str | os.PathLike, expect: str | None = None) -> Path:
    """Convert a Hugging Face GPT-2 directory (config.json, model.safetensors, optionally vocab.json
    + merges.txt) into a model directory at `out`. With `expect` (a hub name), the shape (and tying
    and GELU form) must be that model's, so the cache never holds a wrong model under a name."""
    if expect is not None:
        want, got = preset_config(canonical_name(expect)), read_hf_config(src)
        fields = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "tie_weights", "gelu")
        diff = [
            f"{f} {getattr(got, f)} (expected {getattr(want, f)})"
            for f in fields
            if getattr(got, f) != getattr(want, f)
        ]
        if diff:
            raise ScratchLLMError(
                f"{src} does not hold {expect}: {', '.join(diff)}; pick the matching size (--size), or write "
                "another shape to a directory of your own (--out DIR)"
            )
    check_replaceable(out, CONFIG_FILE, "model directory", inside=[Path(src)])  # before reading src
    model, tokenizer = load_hf_dir(src)
    return save_model(out, model, tokenizer)


def read_hf_config(src: str | os.PathLike) -> GPTConfig:
    """Our GPTConfig for the config.json of a Hugging Face GPT-2 directory."""
    src = Path(src).expanduser()
    if not src.is_dir():
        raise ScratchLLMError(f"{src} is not a directory; give a Hugging Face GPT-2 directory")
    if directory_kind(src) in ("model directory", "checkpoint"):
        raise ScratchLLMError(
            f"{src} is a scratchllm model directory already, nothing to convert; use it as it is (--model {src})"
        )
    return config_from_hf(_read_json(src / CONFIG_FILE), source=str(src / CONFIG_FILE))


def load_hf_dir(src: str | os.PathLike) -> tuple[GPTModel, Tokenizer | None]:
    """Our model (eval mode) and tokenizer (None without vocab.json + merges.txt) from a Hugging
    Face GPT-2 directory, read with safetensors only."""
    src = Path(src).expanduser()
    cfg = read_hf_config(src)
    model = meta_model(cfg)
    tensors = from_hf_state_dict(_iter_hf_tensors(src), cfg, source=str(src))
    load_state_dict_strict(model, tensors, source=f"{src} (converted from Hugging Face names)", assign=True)
    model.eval()
    return model, load_hf_tokenizer(src)


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> GPTConfig:
    """Our GPTConfig for a Hugging Face GPT-2 config; an error for settings our model lacks."""
    if hf.get("model_type") != "gpt2":
        raise ScratchLLMError(
            f'{source}: model_type is {hf.get("model_type")!r}; only GPT-2 ("gpt2") converts'
        )
    try:
        d, n_layers, n_heads, vocab = (int(hf[k]) for k in ("n_embd", "n_layer", "n_head", "vocab_size"))
        context = int(hf.get("n_positions") or hf["n_ctx"])
    except (KeyError, TypeError, ValueError) as e:
        raise ScratchLLMError(f"{source}: missing or bad GPT-2 setting {e}") from e
    unsupported = []
    activation = hf.get("activation_function", "gelu_new")
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


def _iter_hf_tensors(src: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a HF directory's safetensors weights (one file or shards), one at a time,
    so a conversion holds one copy of the model plus one tensor."""
    from safetensors import SafetensorError, safe_open

    index = src / HF_INDEX_FILE
    if (src / HF_WEIGHTS_FILE).is_file():
        files = [src / HF_WEIGHTS_FILE]
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ScratchLLMError(f'{index}: no "weight_map" object')
        files = [src / f for f in sorted(set(weight_map.values()))]
    else:
        other = [p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".h5", ".msgpack")]
        raise ScratchLLMError(
            f"{src}: no {HF_WEIGHTS_FILE}"
            + (
                f" (found {', '.join(other)}: pickled or other formats are not loaded, for safety)"
                if other
                else ""
            )
            + "; save it with transformers' save_pretrained(..., safe_serialization=True)"
        )
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    tensor = f.get_tensor(name)
                    if not HF_BUFFER.fullmatch(name.removeprefix(HF_PREFIX)):  # masks, dropped anyway
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
            f"{path} is missing; a Hugging Face GPT-2 directory has config.json and model.safetensors"
        ) from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScratchLLMError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise ScratchLLMError(f"{path}: expected a JSON object")
    return doc


def load_hf_tokenizer(src: str | os.PathLike) -> Tokenizer | None:
    """The GPT-2-style tokenizer of a HF directory (vocab.json + merges.txt: the formats of OpenAI's
    encoder.json + vocab.bpe under other names), or None when it has none."""
    src = Path(src)
    vocab, merges = src / HF_VOCAB_FILE, src / HF_MERGES_FILE
    if not (vocab.is_file() and merges.is_file()):
        return None
    from .text.bpe import BPETokenizer, read_encoder_files

    ranks, specials, merge_list = read_encoder_files(vocab, merges)
    # GPT-2's own, or another BPE in its format (one exported from here): named by its size then
    size = len(ranks) + len(specials)
    name = "gpt2" if size == 50257 else f"bpe-{size}"
    return BPETokenizer(ranks, pattern="gpt2", special_tokens=specials, name=name, merges=merge_list)


# ----------------------------------------------------------------------------------------------
# Ours -> Hugging Face format


def to_hf_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """Our GPT-2-shaped language model -> `GPT2LMHeadModel` tensors (prefixed names, Conv1D layout).
    A model without q/k/v biases gets zero ones; an untied head is written as lm_head.weight."""
    cfg = model.cfg
    if cfg.n_classes:
        raise ScratchLLMError(
            f"this model is a classifier ({cfg.n_classes} classes), not a language model: GPT-2's Hugging Face "
            "format has no place for its head (GPT2ForSequenceClassification has no head bias)"
        )
    ours = model_tensors(model)
    out = {}
    for name, hf, transposed in name_table(cfg.n_layers):
        if name not in ours and name.endswith("att.qkv.bias"):
            tensor = torch.zeros(3 * cfg.emb_dim, dtype=ours["tok_emb.weight"].dtype)
        else:
            tensor = ours[name]
        out[HF_PREFIX + hf] = tensor.t().contiguous() if transposed else tensor
    if not model.weights_tied:
        out[HF_HEAD] = ours["out_head.weight"]
    return out


EXPORTED_BY = "exported_by"  # in config.json: the mark of a directory `export_hf` wrote, which it may replace


def hf_config(cfg: GPTConfig, tokenizer: Tokenizer | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """A `GPT2Config` dict for our config."""
    eot = tokenizer.eot_id if tokenizer is not None else None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
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
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": str(dtype).removeprefix("torch."),
        EXPORTED_BY: f"scratchllm {__version__}",
    }


def hf_tokenizer_files(tokenizer: Tokenizer, context_length: int) -> dict[str, bytes] | None:
    """vocab.json, merges.txt and tokenizer_config.json for `GPT2TokenizerFast`, or None when the
    tokenizer is not a GPT-2-style BPE (HF's GPT-2 tokenizer has GPT-2's split pattern built in)."""
    from .text.bpe import ENCODER_FILE, GPT2_PATTERN, MERGES_FILE, BPETokenizer

    if not isinstance(tokenizer, BPETokenizer) or tokenizer.pattern != GPT2_PATTERN:
        return None
    files = tokenizer._files()
    eot = EOT if EOT in tokenizer.special_tokens else None
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": context_length,
        "add_prefix_space": False,
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "added_tokens_decoder": {
            str(i): {
                "content": s,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
                "special": True,
            }
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
            f"{out} is a Hugging Face model directory that this export-hf did not write (its config.json has no "
            f"{EXPORTED_BY!r}: another program's, or an export by scratchllm before 2026-11-28); the export "
            "would replace it as a whole, so give a new or empty directory (or delete it first)"
        )


def export_hf(spec: str | os.PathLike | LoadedModel, out: str | os.PathLike) -> Path:
    """Write a model (a directory, hub name or loaded model) as a Hugging Face GPT-2 directory:
    config.json, model.safetensors (+ vocab.json, merges.txt, tokenizer_config.json for a GPT-2-style
    BPE tokenizer). Atomic: `out` appears complete or not at all."""
    from .model.lora import lora_layers, merge_lora
    from .model.quantize import is_quantized

    loaded = spec if isinstance(spec, LoadedModel) else load_model(spec)
    model, tokenizer = loaded.model, loaded.tokenizer
    if is_quantized(model):
        raise ScratchLLMError(
            "a quantized model cannot be exported (int4 is for inference); export the original"
        )
    if lora_layers(model):  # GPT-2 has no place for adapters: they fold into the weights (of a copy)
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
        import warnings

        why = (
            "the model has no tokenizer"
            if tokenizer is None
            else f"its {tokenizer.kind} tokenizer has no GPT-2 form"
        )
        warnings.warn(
            f"{out} holds the weights and config only ({why}); encode text for it with scratchllm's tokenizer",
            stacklevel=2,
        )
    return out


# ----------------------------------------------------------------------------------------------
# The book's GPTModel (llms_from_scratch.ch04) -> ours


def from_book_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The book's state dict (separate W_query/W_key/W_value, causal-mask buffers, an untied
    out_head) -> ours: q/k/v fused into att.qkv, the masks dropped. Load it into a GPTModel built
    from the same settings with tie_weights=False."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        m = re.fullmatch(r"(trf_blocks\.\d+\.att)\.(W_query|W_key|W_value|mask)(?:\.(weight|bias))?", name)
        if m is None:
            out[name] = tensor
        elif m.group(2) != "mask":
            qkv.setdefault(f"{m.group(1)}.qkv.{m.group(3)}", {})[m.group(2)] = tensor
    for name, parts in qkv.items():
        try:
            out[name] = torch.cat([parts["W_query"], parts["W_key"], parts["W_value"]], dim=0)
        except KeyError as e:
            raise ScratchLLMError(f"book state dict: {name} lacks {e.args[0]}") from e
    return out
