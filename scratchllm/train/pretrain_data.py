"""What a pretraining run reads: its tokenizer and its corpus, tokenized once into memory-mapped files.

The tokenizer is the `init_from` model's, a named or saved one, or one trained at the start of the run on
the corpus and kept in out_dir/tokenizer; the data is a directory `scratchllm prepare` wrote, or the corpus
prepared into out_dir/data (text/prepare.py). Both are made once, by the main process, and reused while
the settings that made them stay the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import saved_value
from ..errors import ScratchLLMError
from ..fileio import DATA_META_FILE, DATA_TOKENIZER_DIR, TOKENIZER_META_FILE, atomic_dir
from ..text.bpe import train_bpe
from ..text.char import CharTokenizer
from ..text.corpus import load_documents
from ..text.prepare import prepare
from ..text.registry import load_tokenizer
from ..text.sampling import PreparedData, load_prepared
from ..text.tokenizer import Tokenizer
from .distributed import DistInfo, barrier

if TYPE_CHECKING:  # pretrain.py imports this module
    from .pretrain import PretrainConfig

TRAINED_HERE = ("train", "char")  # --tokenizer values that make the run train its own tokenizer
TRAINED_ON = "trained_on.json"  # in out_dir/tokenizer: what the run's tokenizer was trained as, and on


def resolve_tokenizer(
    cfg: PretrainConfig,
    out_dir: Path,
    dist: DistInfo,
    init_tokenizer: Tokenizer | None,
    checkpoint: Path | None = None,
) -> Tokenizer:
    """The run's tokenizer: the `init_from` model's, a named/saved one, or one trained here on the corpus
    (`train`: byte-level BPE of `vocab_size`; `char`: one id per character), kept in out_dir/tokenizer.
    Resuming from `checkpoint`: the checkpoint's (never trained again), which a named one must equal."""
    if checkpoint is not None and (checkpoint / TOKENIZER_META_FILE).is_file():
        return _checkpoint_tokenizer(cfg, out_dir, dist, init_tokenizer, checkpoint)
    trainable = cfg.tokenizer in TRAINED_HERE
    if init_tokenizer is not None:
        if not trainable and load_tokenizer(cfg.tokenizer).fingerprint() != init_tokenizer.fingerprint():
            raise ScratchLLMError(
                f"--tokenizer {cfg.tokenizer} differs from the tokenizer of --init-from {cfg.init_from}"
            )
        return init_tokenizer
    if not trainable:
        return load_tokenizer(cfg.tokenizer)
    if cfg.data:  # prepared data is tokenized already: its tokenizer is the run's, nothing to train
        prepared_tok = Path(cfg.data).expanduser() / DATA_TOKENIZER_DIR
        if not (prepared_tok / TOKENIZER_META_FILE).is_file():
            raise ScratchLLMError(
                f"--data {cfg.data} is not a prepared data directory (no tokenizer/ inside); "
                "run `scratchllm prepare` first"
            )
        return load_tokenizer(prepared_tok)
    tok_dir = out_dir / "tokenizer"
    recipe = _tokenizer_recipe(cfg)
    if dist.is_main and _read_json(tok_dir / TRAINED_ON) != recipe:
        _train_tokenizer(cfg, tok_dir, recipe)
    barrier(dist)
    return load_tokenizer(tok_dir)


def _checkpoint_tokenizer(
    cfg: PretrainConfig, out_dir: Path, dist: DistInfo, init_tokenizer: Tokenizer | None, checkpoint: Path
) -> Tokenizer:
    """The tokenizer saved with `checkpoint`, after checking that the run's settings give the same one."""
    theirs = load_tokenizer(checkpoint)

    def differs(ours: str) -> ScratchLLMError:
        return ScratchLLMError(
            f"{checkpoint} was trained with the tokenizer {theirs.name!r} ({theirs.vocab_size} ids); this "
            f"run's settings give {ours}: resume with the run's settings (its config.toml)"
        )

    if cfg.tokenizer in TRAINED_HERE and not cfg.data and init_tokenizer is None:
        # trained at the start of the run: the same kind and size again, whatever the corpus now
        recipe = _read_json(out_dir / "tokenizer" / TRAINED_ON)
        wanted = _tokenizer_recipe(cfg)
        if recipe and any(recipe.get(k) != wanted[k] for k in ("kind", "vocab_size")):
            size = f" of {cfg.vocab_size} ids" if cfg.tokenizer == "train" else ""
            raise differs(f"--tokenizer {cfg.tokenizer}{size}")
        return theirs
    ours = resolve_tokenizer(cfg, out_dir, dist, init_tokenizer)  # loads, never trains here
    if ours.fingerprint() != theirs.fingerprint():
        raise differs(f"{ours.name!r} ({ours.vocab_size} ids)")
    return ours


def _train_tokenizer(cfg: PretrainConfig, tok_dir: Path, recipe: dict[str, Any]) -> None:
    """Train the run's tokenizer on the corpus and save it, with its `recipe`, in `tok_dir`."""
    docs = load_documents(cfg.corpus, cfg.encoding_errors)
    if cfg.tokenizer == "char":
        tok: Tokenizer = CharTokenizer.from_corpus(d.text for d in docs)
    else:
        print(f"training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) on {len(docs)} documents")
        texts = (d.text for d in docs)
        tok = train_bpe(texts, cfg.vocab_size, progress=cfg.progress, name=f"bpe-{cfg.vocab_size}")
    with atomic_dir(tok_dir, marker=TOKENIZER_META_FILE, what="tokenizer directory") as tmp:
        tok.save(tmp)
        (tmp / TRAINED_ON).write_text(json.dumps(recipe))


def resolve_data(
    cfg: PretrainConfig, tokenizer: Tokenizer, out_dir: Path, dist: DistInfo, resuming: bool = False
) -> PreparedData:
    """The run's train/val tokens: `cfg.data` (prepared earlier), or the corpus prepared into out_dir/data,
    again only when the tokenizer, the corpus or the split changed."""
    if cfg.data:
        prepared = load_prepared(Path(cfg.data).expanduser(), expected_tokenizer=tokenizer)
        if len(prepared.val) < 2:
            used = prepared.meta.get("split", {}).get("val_fraction") or 0
            hint = "more text" if used >= 0.1 else "--val-fraction 0.1 (or more text)"
            raise ScratchLLMError(
                f"--data {cfg.data} has {len(prepared.val)} validation tokens (--val-fraction {used}); "
                f"re-run `scratchllm prepare` with {hint}"
            )
        return prepared
    data_dir = out_dir / "data"
    if dist.is_main:
        meta_path = data_dir / DATA_META_FILE
        meta = _read_json(meta_path)  # unreadable (a crash mid-write): prepared again
        reuse = bool(meta) and (
            meta.get("tokenizer", {}).get("fingerprint") == tokenizer.fingerprint()
            and meta.get("split", {}).get("val_fraction") == cfg.val_fraction
            and meta.get("corpus") in (saved_value(cfg, "corpus"), cfg.corpus)  # older runs: as given
        )
        if not reuse:
            if resuming and meta_path.exists():
                print(
                    "warning: resuming on other data (--corpus or --val-fraction changed): training goes on, "
                    "but not as the stopped run would have"
                )
            prepare(
                cfg.corpus,
                tokenizer,
                data_dir,
                val_fraction=cfg.val_fraction,
                workers=cfg.workers,
                encoding_errors=cfg.encoding_errors,
                seed=cfg.seed,
                progress=cfg.progress,
                extra_meta={"corpus": saved_value(cfg, "corpus")},
            )
    barrier(dist)
    return load_prepared(data_dir, expected_tokenizer=tokenizer)


def _read_json(path: Path) -> dict[str, Any]:
    """A run's own small JSON record, or {} when it is missing or cut short (it is made again then)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _tokenizer_recipe(cfg: PretrainConfig) -> dict[str, Any]:
    return {
        "kind": cfg.tokenizer,
        "corpus": saved_value(cfg, "corpus"),
        "vocab_size": cfg.vocab_size if cfg.tokenizer == "train" else None,
    }
