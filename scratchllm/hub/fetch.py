"""Models by name: hub names, the cache of converted models, downloads from the Hugging Face hub,
and `load_model`, which takes a model directory or a hub name.

A hub name is a preset that its family's registry entry links to a Hugging Face repository
(`gpt2-medium`), or an alias of one (`gpt2`, `355M`). Converted models are cached in
`$SCRATCHLLM_HOME/models/NAME` (default `~/.cache/scratchllm/models/NAME`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint
from ..checkpoint import LoadedModel, missing_model_error
from ..config import setting
from ..errors import ScratchLLMError
from ..fileio import CONFIG_FILE
from ..model.registry import Architecture, hf_architectures
from .convert import HF_INDEX_FILE, HF_WEIGHTS_FILE, convert_hf_dir

# What a download fetches: the weights (one file, or shards with an index), the config, the tokenizer
# (GPT-2's files, or tokenizer.json with its settings and chat template), the generation settings.
HF_DOWNLOAD_FILES = [
    CONFIG_FILE,
    HF_WEIGHTS_FILE,
    HF_INDEX_FILE,
    "model-*-of-*.safetensors",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
]
HUB_NAMES_HELP = (
    "a hub name (gpt2, gpt2-medium, llama3.2-1b, qwen3-0.6b, gemma3-270m, ...: `scratchllm info --list`)"
)


def hub_names() -> list[str]:
    """Every hub name: per family, its own name, its presets with a repository, their other aliases."""
    names = []
    for arch in hf_architectures():
        aliases = [a for a, key in arch.aliases.items() if key in arch.hf.repos]
        names += [a for a in aliases if a == arch.name] + list(arch.hf.repos)
        names += [a for a in aliases if a != arch.name]
    return names


def is_hub_name(name: str) -> bool:
    """`name` is a model on the Hugging Face hub (downloaded and converted on first use)."""
    return name in hub_names()


def canonical_name(name: str) -> str:
    """The preset a hub name stands for: `gpt2`, `124M`, `gpt2-small` -> `gpt2-small`, etc."""
    for arch in hf_architectures():
        key = arch.aliases.get(name, name)
        if key in arch.hf.repos:
            return key
    raise ScratchLLMError(
        f"unknown model {name!r} on the Hugging Face hub; choose one of {', '.join(hub_names())}"
    )


def _hub_architecture(key: str) -> Architecture:
    """The family of a canonical hub name."""
    return next(arch for arch in hf_architectures() if key in arch.hf.repos)


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
    return cached_model(name) or download_model(name, progress=progress)


# ----------------------------------------------------------------------------------------------
# Model specs: a directory or a hub name


def check_model_spec(spec: str | os.PathLike) -> None:
    """A one-line error unless `spec` is a directory or a hub name (nothing is read or fetched):
    commands check their model this way before slower work such as loading or downloading data."""
    if not Path(spec).expanduser().is_dir() and not is_hub_name(str(spec)):
        raise missing_model_error(spec, hub_names())


def resolve_model(spec: str | os.PathLike) -> Path:
    """A model directory for `spec`: an existing directory as is, a hub name through the cache
    (downloaded and converted on first use)."""
    check_model_spec(spec)
    path = Path(spec).expanduser()
    return path if path.is_dir() else fetch_model(str(spec))


def load_model(
    spec: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
) -> LoadedModel:
    """Load a model directory, or a hub name (`gpt2`, `gpt2-medium`, `124M`, ...: converted once
    into the cache). `dtype` None keeps the stored precision. `quantize` "int4": quantize the linear
    layers for inference on a CPU (model/quantize.py). See `checkpoint.load_model`."""
    return checkpoint.load_model(resolve_model(spec), device=device, dtype=dtype, quantize=quantize)


# ----------------------------------------------------------------------------------------------
# Download


def download_model(name: str, out: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Fetch a hub model (`gpt2`, `gpt2-medium`, ..., or `124M`, ...) from the Hugging Face hub and
    convert it into a model directory (default: the cache, see `cache_dir`)."""
    key = canonical_name(name)
    arch = _hub_architecture(key)
    short = arch.name if arch.aliases.get(arch.name) == key else key  # the name errors advise
    snapshot = hf_snapshot(arch.hf.repos[key], progress=progress, name=short)
    return convert_hf_dir(snapshot, out if out is not None else cache_dir(key), expect=key)


@dataclass
class DownloadSettings:
    """`scratchllm download`: a model from the Hugging Face hub, or a local copy converted."""

    name: str = setting(
        "gpt2",
        "the model: gpt2 (--size picks among its four), gpt2-medium, llama3.2-1b, qwen3-0.6b, qwen3-30b-a3b, "
        "gemma3-270m, ... (`scratchllm info --list`)",
        "model",
        positional="?",
        choices=tuple(hub_names()),
        metavar="NAME",
    )
    size: str | None = setting(
        None, "GPT-2 size (default: 124M)", "model", choices=("124M", "355M", "774M", "1558M")
    )
    out: str | None = setting(
        None,
        "model directory to write (default: the cache, ~/.cache/scratchllm/models/NAME, or under "
        "$SCRATCHLLM_HOME)",
        "model",
    )
    src: str | None = setting(
        None,
        "convert a local Hugging Face directory (config.json, model.safetensors or its shards, and the "
        "tokenizer: tokenizer.json or vocab.json + merges.txt) instead of downloading",
        "model",
        flags=("--from",),
        metavar="DIR",
    )
    quiet: bool = setting(False, "no progress bars", "model")


def download_command(settings: DownloadSettings) -> None:
    """`scratchllm download`: `name` (`gpt2` or a sized name) and `size` (`124M`, ...) pick the model;
    `src` converts a local Hugging Face directory instead of downloading. Prints the model directory."""
    name, size, out, src = settings.name, settings.size, settings.out, settings.src
    key = canonical_name(name)
    if size is not None:
        arch = _hub_architecture(key)
        sizes = {a: k for a, k in arch.aliases.items() if a != arch.name and k in arch.hf.repos}
        if size not in sizes:
            raise ScratchLLMError(f"unknown {arch.hf.label} size {size!r}; choose one of {', '.join(sizes)}")
        if name != arch.name and key != sizes[size]:
            raise ScratchLLMError(f"{name} is not the {size} model ({sizes[size]}); give one of the two")
        key = sizes[size]
    if src is None:
        path = download_model(key, out, progress=not settings.quiet)
    elif out is not None:  # any shape converts to a directory of the user's choosing
        path = convert_hf_dir(src, out)
    else:
        path = convert_hf_dir(src, cache_dir(key), expect=key)
    print(f"saved the model directory {path}")


def hf_snapshot(repo_id: str, progress: bool = True, name: str = "gpt2") -> Path:
    """The local snapshot directory of `repo_id` with the files in `HF_DOWNLOAD_FILES`: what is
    already in huggingface_hub's cache, the rest downloaded (resumable). The only network call of
    hub/; with HF_HUB_OFFLINE set, the cache alone. `name`: the hub name errors advise."""
    from huggingface_hub import snapshot_download  # optional and slow to import
    from huggingface_hub.errors import GatedRepoError

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    if not progress:
        from huggingface_hub.utils import disable_progress_bars  # as above

        disable_progress_bars()
    retry = "unset HF_HUB_OFFLINE, connect to the network" if offline else "connect to the network"
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HF_DOWNLOAD_FILES, local_files_only=offline))
    except Exception as e:  # no network, offline mode, a proxy, an HTTP error: all "cannot get it now"
        if isinstance(e, GatedRepoError):
            raise ScratchLLMError(
                f"{repo_id} is a gated model: accept its license at https://huggingface.co/{repo_id} with "
                "your account, then give your access token as HF_TOKEN (or run `hf auth login`) and try "
                f"again; or convert a local copy with `scratchllm download {name} --from DIR`"
            ) from e
        reason = "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache" if offline else _one_line(e)
        raise ScratchLLMError(
            f"cannot download {repo_id} from the Hugging Face hub ({reason}). To fix: {retry} and try again, "
            "or convert a local copy (a directory with config.json, the safetensors weights and the "
            f"tokenizer files) with `scratchllm download {name} --from DIR`"
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
