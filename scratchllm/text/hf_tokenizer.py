"""`HFTokenizer`: a model's own Hugging Face tokenizer (tokenizer.json), encoding through the `tokenizers`
library, with the model's chat template.

What a Hugging Face model directory says about its tokenizer, and where:
- tokenizer.json: the whole tokenizer (normalizer, pre-tokenizer, BPE or other model, added tokens,
  post-processor, decoder); the `tokenizers` library runs it exactly;
- tokenizer_config.json: which added tokens are BOS, EOS and padding, whether a prompt starts with BOS
  (`add_bos_token`), and the chat template (also in chat_template.jinja, where newer transformers put it);
- generation_config.json: `eos_token_id`, every id that ends the model's turn (Llama 3 Instruct and Gemma 3
  stop at more than the EOS of tokenizer_config.json).

Encoding keeps the project's rule: a special token's string in text is ordinary text unless allowed. The
library itself matches every special token wherever it occurs, so a text is encoded by an instance of the
same tokenizer whose specials that are not allowed are switched off (see `HFTokenizer.encode`).

Decoding to bytes follows the tokenizer's decoder (byte-level BPE's byte table, SentencePiece's `▁` and
`<0xNN>` byte tokens), so the bytes of a prefix that ends inside a character are the true ones.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ScratchLLMError, first_line
from .bpe import unicode_to_bytes
from .bpe.encode import replace_lone_surrogates
from .chat_template import render_chat
from .tokenizer import AllowedSpecial, Tokenizer, check_not_text

if TYPE_CHECKING:
    import tokenizers

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"  # older repositories name BOS/EOS/PAD here instead

_MAX_ENCODERS = 8  # instances kept for distinct `allowed_special` sets (one JSON load each)
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json (with its tokenizer_config.json), run by the `tokenizers` library."""

    kind = "hf"

    def __init__(
        self,
        tokenizer_json: str,
        *,
        name: str = "hf",
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        add_bos: bool | None = None,
        chat_template: str | None = None,
        generation_eos_ids: Sequence[int] = (),
        source: str = TOKENIZER_FILE,
    ):
        """`tokenizer_json`: the text of a tokenizer.json. `bos_token` (default: the token the post-processor
        puts first, if any), `eos_token`, `pad_token`: added tokens' strings. `add_bos`: whether a prompt
        starts with BOS (default: whether the post-processor adds it). `generation_eos_ids`: more ids that
        end a reply. `source` names the file in error messages."""
        self.name = name
        self._json = tokenizer_json
        self._source = source
        spec = _parse_json(tokenizer_json, source)
        self._tok = _library_tokenizer(tokenizer_json, source)
        added = self._tok.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        self._vocab_size = max([self._tok.get_vocab_size(with_added_tokens=False), *(i + 1 for i in added)])
        first = _post_processor_first_token(spec.get("post_processor"))
        self.bos_token = bos_token if bos_token is not None else first
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.bos_id, self.eos_id, self.pad_id = (
            self._token_id(t, f) for t, f in ((self.bos_token, "bos"), (eos_token, "eos"), (pad_token, "pad"))
        )
        self._add_bos = add_bos if add_bos is not None else first is not None
        self.chat_template = chat_template
        self.generation_eos_ids = [int(i) for i in generation_eos_ids]
        self._decode_steps = _decoder_steps(spec.get("decoder"))
        self._byte_level_only = self._decode_steps == [_byte_level]
        self._encoders: dict[frozenset[str], tokenizers.Tokenizer] = {
            frozenset(self.special_tokens): self._tok
        }
        self._token_bytes: dict[int, bytes] = {}
        self._fingerprint: str | None = None

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, name: str | None = None) -> HFTokenizer:
        """The tokenizer of a Hugging Face model directory: tokenizer.json, and tokenizer_config.json,
        special_tokens_map.json, chat_template.jinja and generation_config.json where present."""
        directory = Path(directory).expanduser()
        if not (directory / TOKENIZER_FILE).is_file():
            raise ScratchLLMError(
                f"{directory}: no {TOKENIZER_FILE}; a Hugging Face tokenizer directory needs it (download "
                "the model's tokenizer files too)"
            )

        def optional(fname: str) -> Path | None:
            return directory / fname if (directory / fname).is_file() else None

        return cls.from_files(
            directory / TOKENIZER_FILE,
            optional(CONFIG_FILE),
            special_tokens_map=optional(SPECIAL_TOKENS_MAP_FILE),
            generation_config=optional(GENERATION_CONFIG_FILE),
            chat_template_file=optional(TEMPLATE_FILE),
            name=name or _directory_name(directory),
        )

    @classmethod
    def from_files(
        cls,
        tokenizer_json: str | os.PathLike,
        tokenizer_config: str | os.PathLike | None = None,
        *,
        special_tokens_map: str | os.PathLike | None = None,
        generation_config: str | os.PathLike | None = None,
        chat_template_file: str | os.PathLike | None = None,
        name: str | None = None,
    ) -> HFTokenizer:
        """A tokenizer.json with, optionally, its tokenizer_config.json, special_tokens_map.json (for the
        tokens the config leaves unset), generation_config.json (for the stop ids) and chat_template.jinja
        (which wins over tokenizer_config.json's template)."""
        path = Path(tokenizer_json).expanduser()
        settings = read_tokenizer_config(tokenizer_config) if tokenizer_config is not None else {}
        if special_tokens_map is not None:
            for field, token in read_tokenizer_config(special_tokens_map).items():
                if field.endswith("_token") and settings.get(field) is None:
                    settings[field] = token
        if chat_template_file is not None:
            settings["chat_template"] = _read_text(Path(chat_template_file), "chat template")
        eos_ids = read_generation_eos_ids(generation_config) if generation_config is not None else []
        return cls(
            _read_text(path, "tokenizer"),
            name=name or _directory_name(path.parent),
            generation_eos_ids=eos_ids,
            source=str(path),
            **settings,
        )

    @classmethod
    def from_tokenizer(cls, tokenizer: tokenizers.Tokenizer, **settings: Any) -> HFTokenizer:
        """Wrap a `tokenizers.Tokenizer` object; `settings` as for the constructor (`eos_token`, ...)."""
        return cls(tokenizer.to_str(), **settings)

    def _token_id(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ScratchLLMError(
                f"{self._source}: the {what} token {token!r} is not in the tokenizer's vocabulary; fix "
                f"{what}_token in {CONFIG_FILE}"
            )
        return token_id

    # -- properties ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def tokenizer(self) -> tokenizers.Tokenizer:
        """The `tokenizers.Tokenizer` doing the work (all specials on)."""
        return self._tok

    @property
    def add_bos(self) -> bool:
        """Whether a prompt starts with BOS (`encode_prompt` adds it; `encode` never does)."""
        return self._add_bos and self.bos_id is not None

    @property
    def eot_id(self) -> int | None:
        """The EOS id of tokenizer_config.json: the document separator and default end of sequence (for
        Qwen3 Instruct `<|im_end|>`); `<|endoftext|>`'s id when no EOS is set."""
        return self.eos_id if self.eos_id is not None else super().eot_id

    @property
    def stop_ids(self) -> list[int]:
        """The ids that end a reply: EOS, then generation_config.json's `eos_token_id`s, without repeats."""
        ids = [self.eos_id] if self.eos_id is not None else []
        return list(dict.fromkeys([*ids, *self.generation_eos_ids]))

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """Token ids of `text`, without BOS. Specials not in `allowed_special` are encoded as ordinary text,
        exactly as the library does with them switched off (transformers' `split_special_tokens=True`):
        the text goes whole through a second instance of this tokenizer.json in which they are not special."""
        self._check_text(text)
        encoder = self._encoder(self._allowed(allowed_special))
        try:
            return encoder.encode(text, add_special_tokens=False).ids
        except TypeError:  # lone surrogates cannot go to Rust; they become U+FFFD, as in tiktoken
            return encoder.encode(replace_lone_surrogates(text), add_special_tokens=False).ids

    def encode_batch(
        self, texts: Sequence[str], allowed_special: AllowedSpecial = frozenset()
    ) -> list[list[int]]:
        """Many texts at once, on the library's threads."""
        self._check_texts(texts)
        for text in texts:
            self._check_text(text)
        texts = [replace_lone_surrogates(t) for t in texts]
        encodings = self._encoder(self._allowed(allowed_special)).encode_batch(
            texts, add_special_tokens=False
        )
        return [e.ids for e in encodings]

    def encode_prompt(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """`encode`, with BOS first when the model's prompts start with it (`add_bos`)."""
        ids = self.encode(text, allowed_special)
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """The prompt text of a conversation in the model's chat format (see text/chat_template.py);
        `extra`: more template variables, e.g. `enable_thinking=False`."""
        if self.chat_template is None:
            raise ScratchLLMError(
                f"tokenizer {self.name!r} has no chat template (none in {CONFIG_FILE} or {TEMPLATE_FILE}); "
                "use a model's instruct/chat tokenizer, or a prompt format of your own"
            )
        if self.pad_token is not None:
            extra.setdefault("pad_token", self.pad_token)
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **extra,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> list[int]:
        """The ids of `apply_chat_template`'s text, every special token in it on (the template writes BOS
        itself when the model wants it, so none is added), as transformers tokenizes a chat."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra), "all")

    def _encoder(self, allowed: frozenset[str]) -> tokenizers.Tokenizer:
        """The library instance that matches exactly the `allowed` specials: this tokenizer.json with the
        other specials' `special` flag kept and the allowed ones' cleared (so they stay plain added tokens,
        ids unchanged), and the library's switch that skips special tokens in text turned on."""
        encoder = self._encoders.get(allowed)
        if encoder is None:
            tokenizer_json = self._json
            if allowed:
                spec = json.loads(tokenizer_json)
                for token in spec.get("added_tokens") or []:
                    if token.get("content") in allowed:
                        token["special"] = False
                tokenizer_json = json.dumps(spec)
            encoder = _library_tokenizer(tokenizer_json, self._source)
            encoder.encode_special_tokens = True
            if len(self._encoders) >= _MAX_ENCODERS:
                self._encoders = {frozenset(self.special_tokens): self._tok}
            self._encoders[allowed] = encoder
        return encoder

    def __getstate__(self) -> dict[str, Any]:
        # a pickled `tokenizers.Tokenizer` loses its `encode_special_tokens` switch: rebuild them instead
        return {**self.__dict__, "_encoders": {}, "_token_bytes": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._encoders = {frozenset(self.special_tokens): self._tok}

    # -- decoding ------------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of `ids` through the tokenizer's decoder, special tokens as their strings. For
        byte-level and byte-fallback tokenizers these are the true bytes, also of a prefix that ends inside
        a character; for other decoders, the library's decoded text as UTF-8."""
        check_not_text(ids, self.name)
        ids = ids if isinstance(ids, (list, tuple)) else list(ids)
        if self._byte_level_only:  # byte-level BPE (Llama 3, Qwen): one cached lookup per token
            return b"".join(map(self._byte_level_token, ids))
        tokens = [self._token(i) for i in ids]
        if self._decode_steps is None:
            return self._tok.decode([int(i) for i in ids], skip_special_tokens=False).encode("utf-8")
        pieces = [t.encode("utf-8") for t in tokens]
        for step in self._decode_steps:
            pieces = step(pieces)
        return b"".join(pieces)

    def _token(self, token_id: Any) -> str:
        """The token string of an id (an added token's content); an id outside the vocabulary is an error."""
        try:
            i = operator.index(token_id)  # an int, numpy's or a tensor's too, but not a float
            token = self._tok.id_to_token(i) if i >= 0 else None
        except (TypeError, OverflowError):
            token = None
        if token is None:
            raise ScratchLLMError(
                f"tokenizer {self.name!r}: token id {token_id!r} is not in the vocabulary "
                f"(ids 0..{self._vocab_size - 1})"
            )
        return token

    def _byte_level_token(self, token_id: Any) -> bytes:
        data = self._token_bytes.get(token_id)
        if data is None:
            data = _byte_level([self._token(token_id).encode("utf-8")])[0]
            if isinstance(token_id, int):  # a tensor's hash is its identity: no use as a key
                self._token_bytes[token_id] = data
        return data

    # -- files ---------------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        """The tokenizer_config.json written by `save`: the fields read here (transformers reads it too)."""
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self._add_bos,
        }
        for field, value in (
            ("bos_token", self.bos_token),
            ("eos_token", self.eos_token),
            ("pad_token", self.pad_token),
            ("chat_template", self.chat_template),
        ):
            if value is not None:
                config[field] = value
        return config

    def _files(self) -> dict[str, bytes]:
        return {
            TOKENIZER_FILE: self._json.encode("utf-8"),
            CONFIG_FILE: (json.dumps(self._config(), indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
        }

    def _meta(self) -> dict[str, Any]:
        return {"files": [TOKENIZER_FILE, CONFIG_FILE], "generation_eos_ids": self.generation_eos_ids}

    @classmethod
    def _load(cls, directory: Path, meta: dict[str, Any]) -> HFTokenizer:
        settings = (
            read_tokenizer_config(directory / CONFIG_FILE) if (directory / CONFIG_FILE).is_file() else {}
        )
        return cls(
            _read_text(directory / TOKENIZER_FILE, "tokenizer"),
            name=meta.get("name", "hf"),
            generation_eos_ids=[int(i) for i in meta.get("generation_eos_ids", [])],
            source=str(directory / TOKENIZER_FILE),
            **settings,
        )

    def fingerprint(self) -> str:
        """Hash of what decides the ids: tokenizer.json, the specials, BOS/EOS (EOS separates documents);
        not the chat template or the stop ids."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            head = {
                "kind": self.kind,
                "special_tokens": self.special_tokens,
                "bos": self.bos_token,
                "eos": self.eos_token,
                "add_bos": self.add_bos,
            }
            h.update(json.dumps(head, sort_keys=True).encode())
            h.update(hashlib.sha256(self._json.encode("utf-8")).digest())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


# ----------------------------------------------------------------------------------------------
# Reading the files


def read_tokenizer_config(path: str | os.PathLike) -> dict[str, Any]:
    """The settings `HFTokenizer` takes from a tokenizer_config.json: `bos_token`, `eos_token`,
    `pad_token` (strings; transformers' {"content": ...} form too), `add_bos` and `chat_template` (a
    string; of a list of named templates, the "default" one)."""
    path = Path(path).expanduser()
    config = _parse_json(_read_text(path, "tokenizer config"), str(path))
    if not isinstance(config, dict):
        raise ScratchLLMError(f"{path}: a tokenizer config must be a JSON object; fix or delete the file")
    settings: dict[str, Any] = {
        f: _token_string(config.get(f), f, path) for f in ("bos_token", "eos_token", "pad_token")
    }
    add_bos = config.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise ScratchLLMError(f"{path}: add_bos_token must be true or false, got {add_bos!r}")
    settings["add_bos"] = add_bos
    settings["chat_template"] = _template_string(config.get("chat_template"), path)
    return settings


def read_generation_eos_ids(path: str | os.PathLike) -> list[int]:
    """generation_config.json's `eos_token_id` (one id or a list) as a list; [] when it has none."""
    path = Path(path).expanduser()
    config = _parse_json(_read_text(path, "generation config"), str(path))
    if not isinstance(config, dict):
        raise ScratchLLMError(f"{path}: a generation config must be a JSON object; fix or delete the file")
    eos = config.get("eos_token_id")
    if eos is None:
        return []
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ScratchLLMError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}")
    return ids


def _token_string(value: Any, field: str, path: Path) -> str | None:
    if isinstance(value, dict):  # transformers' AddedToken form
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise ScratchLLMError(f"{path}: {field} must be a token string or null, got {value!r}")


def _template_string(value: Any, path: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        named = {t.get("name"): t.get("template") for t in value}
        template = named.get("default")
        if template is None or isinstance(template, str):
            return template
    raise ScratchLLMError(
        f"{path}: chat_template must be a string or a list of {{'name', 'template'}} objects, got "
        f"{type(value).__name__}"
    )


def _directory_name(directory: Path) -> str:
    """A tokenizer's name from its directory; in the Hugging Face cache
    (models--Qwen--Qwen3-0.6B/snapshots/<commit>), the repository's."""
    directory = directory.resolve()
    repo = directory.parent.parent.name
    if directory.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/")
    return directory.name or "hf"


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScratchLLMError(f"{what} file {path} not found; check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScratchLLMError(f"cannot read {what} file {path} ({first_line(e)}); download it again") from e


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ScratchLLMError(
            f"{source}: not valid JSON ({e}); the file is damaged, download it again"
        ) from e


def _library_tokenizer(tokenizer_json: str, source: str) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` from tokenizer.json's text, with its truncation and padding off (`encode`
    returns every id of a text, unpadded)."""
    try:
        import tokenizers
    except ImportError as e:
        raise ScratchLLMError(
            "Hugging Face tokenizers need the `tokenizers` library: pip install 'tokenizers>=0.19'"
        ) from e
    try:
        tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # the library raises a bare Exception for any file it cannot read
        raise ScratchLLMError(
            f"{source}: not a tokenizer.json the `tokenizers` library can read ({first_line(e)}); download "
            "it again or upgrade tokenizers"
        ) from e
    tok.no_truncation()
    tok.no_padding()
    return tok


def _post_processor_first_token(post: Any) -> str | None:
    """The special token the post-processor puts before a text (Llama 3's `<|begin_of_text|>`), if any."""
    if not isinstance(post, dict):
        return None
    kind = post.get("type")
    if kind == "Sequence":
        firsts = (_post_processor_first_token(p) for p in post.get("processors") or [])
        return next((t for t in firsts if t is not None), None)
    if kind == "TemplateProcessing":
        single = post.get("single") or [{}]
        special = single[0].get("SpecialToken") if isinstance(single[0], dict) else None
        return special.get("id") if isinstance(special, dict) else None
    if kind in ("BertProcessing", "RobertaProcessing"):
        cls_token = post.get("cls")
        return cls_token[0] if isinstance(cls_token, list) and cls_token else None
    return None


# ----------------------------------------------------------------------------------------------
# Decoding to bytes: the library's decoders, on bytes instead of text

_Step = Callable[[list[bytes]], list[bytes]]


def _decoder_steps(spec: Any) -> list[_Step] | None:
    """tokenizer.json's decoder as steps over the tokens' bytes; None for one not written here (the
    library's decoded text is used then)."""
    if not isinstance(spec, dict):
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        steps: list[_Step] = []
        for part in spec.get("decoders") or []:
            more = _decoder_steps(part)
            if more is None:
                return None
            steps += more
        return steps
    if kind == "ByteLevel":
        return [_byte_level]
    if kind == "ByteFallback":
        return [_byte_fallback]
    if kind == "Fuse":
        return [_fuse]
    if kind == "Replace" and isinstance((spec.get("pattern") or {}).get("String"), str):
        old, new = spec["pattern"]["String"].encode("utf-8"), spec.get("content", "").encode("utf-8")
        return [partial(_replace, old=old, new=new)]
    if kind == "Strip":
        char = spec.get("content", " ").encode("utf-8")
        return [partial(_strip, char=char, start=int(spec.get("start", 0)), stop=int(spec.get("stop", 0)))]
    if kind == "Metaspace":
        prepend = spec.get("prepend_scheme", "always" if spec.get("add_prefix_space", True) else "never")
        replacement = spec.get("replacement", "▁").encode("utf-8")
        return [partial(_metaspace, replacement=replacement, drop_first=prepend != "never")]
    return None


def _byte_level(pieces: list[bytes]) -> list[bytes]:
    """GPT-2's byte table backwards, all tokens fused into one; a token with a character outside the
    table (an added token such as "\\n\\n") stands for its own UTF-8."""
    table = unicode_to_bytes()
    out = []
    for piece in pieces:
        text = piece.decode("utf-8", "replace")
        out.append(bytes(table[c] for c in text) if all(c in table for c in text) else piece)
    return [b"".join(out)]


def _byte_fallback(pieces: list[bytes]) -> list[bytes]:
    """`<0xNN>` tokens become the byte NN (the library makes a broken character U+FFFD; we keep the byte)."""
    out = []
    for piece in pieces:
        m = _BYTE_TOKEN.fullmatch(piece.decode("utf-8", "replace")) if len(piece) == 6 else None
        out.append(bytes([int(m.group(1), 16)]) if m else piece)
    return out


def _fuse(pieces: list[bytes]) -> list[bytes]:
    return [b"".join(pieces)]


def _replace(pieces: list[bytes], old: bytes, new: bytes) -> list[bytes]:
    return [p.replace(old, new) for p in pieces]


def _strip(pieces: list[bytes], char: bytes, start: int, stop: int) -> list[bytes]:
    """Up to `start` leading and `stop` trailing `char`s off each piece."""
    out = []
    for piece in pieces:
        for _ in range(start):
            piece = piece.removeprefix(char)
        for _ in range(stop):
            piece = piece.removesuffix(char)
        out.append(piece)
    return out


def _metaspace(pieces: list[bytes], replacement: bytes, drop_first: bool) -> list[bytes]:
    """`▁` back to a space; in the first token the library drops it (the space the pre-tokenizer added)."""
    return [p.replace(replacement, b"" if i == 0 and drop_first else b" ") for i, p in enumerate(pieces)]
