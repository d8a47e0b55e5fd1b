"""HFTokenizer against the `tokenizers` library, on tokenizer.json files built here (no network): a byte-level
BPE in the style of Llama 3 / Qwen, and a SentencePiece-style BPE with byte fallback in the style of Gemma."""

from __future__ import annotations

import json
import pickle

import pytest

from scratchllm.errors import ScratchLLMError
from scratchllm.text.hf_tokenizer import HFTokenizer
from scratchllm.text.registry import KINDS, load_tokenizer
from tests.conftest import require_transformers

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

CORPUS = [
    "Hello world, this is a small test of the tokenizer.",
    "The model speaks to the user, and the user answers the model.",
    "héllo wörld, café crème 日本語 😀",
    "    indented code\n\tand tabs\n\nnew paragraphs",
] * 4
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|eot_id|>"]
TEXTS = [
    "Hello world",
    " the user answers.",
    "héllo wörld 日本語 😀 and 𝄞 (never seen) ñ",
    "  two spaces\n\nnewlines\ttab ",
    "",
]
SPECIAL_TEXT = "<|im_start|>user\nhi there<|im_end|>\n<|endoftext|>x<|im_start|>assistant\n"


def byte_level(llama_post_processor: bool = False, vocab_size: int = 400) -> tokenizers.Tokenizer:
    """A tiny byte-level BPE: ChatML specials, a non-special added token, optionally Llama 3's
    post-processor that puts <|begin_of_text|> first."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(CHATML)
    tok.add_tokens([AddedToken("<think>", special=False)])
    if llama_post_processor:
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single="<|begin_of_text|> $A",
                    pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                    special_tokens=[("<|begin_of_text|>", bos)],
                ),
            ]
        )
    return tok


def sentencepiece_like(decoder: str = "gemma", prepend_scheme: str = "never") -> tokenizers.Tokenizer:
    """A tiny BPE in Gemma's style: `▁` for spaces, `<0x00>`..`<0xFF>` byte-fallback tokens in the vocabulary
    (ids 4..259), specials <pad> <eos> <bos> <unk> first, <bos> added by the post-processor."""
    base = tokenizers.Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    base.train_from_iterator(
        ["hello world, the model speaks to the user. café"] * 4,
        trainers.BpeTrainer(vocab_size=90, show_progress=False),
    )
    learned = json.loads(base.to_str())["model"]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {s: i for i, s in enumerate([*specials, *(f"<0x{b:02X}>" for b in range(256))])}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = tokenizers.Tokenizer(
        models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True)
    )
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme)
    tok.decoder = {
        "gemma": decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]),
        "llama2": decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        ),
        "metaspace": decoders.Metaspace(prepend_scheme=prepend_scheme),
        "none": None,
    }[decoder]
    tok.add_special_tokens([*specials, "<start_of_turn>", "<end_of_turn>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
    )
    return tok


@pytest.fixture(scope="module")
def qwen_lib() -> tokenizers.Tokenizer:
    return byte_level()


@pytest.fixture(scope="module")
def gemma_lib() -> tokenizers.Tokenizer:
    return sentencepiece_like()


@pytest.fixture(params=["byte-level", "sentencepiece"])
def lib(request, qwen_lib, gemma_lib) -> tokenizers.Tokenizer:
    return qwen_lib if request.param == "byte-level" else gemma_lib


def write_hf_dir(path, lib, config=None, generation=None, template_file=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(lib.to_str(), encoding="utf-8")
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")
    if template_file is not None:
        (path / "chat_template.jinja").write_text(template_file, encoding="utf-8")
    return path


def library_ids(lib, text: str, split_specials: bool = False) -> list[int]:
    lib.encode_special_tokens = split_specials
    try:
        return lib.encode(text, add_special_tokens=False).ids
    finally:
        lib.encode_special_tokens = False


# -- encoding -------------------------------------------------------------------------------------


def test_kind_is_registered():
    assert KINDS["hf"] is HFTokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_plain_text_gives_the_library_ids(lib, text):
    assert HFTokenizer.from_tokenizer(lib).encode(text) == library_ids(lib, text)


def test_allowed_specials_give_the_library_ids(qwen_lib):
    tok = HFTokenizer.from_tokenizer(qwen_lib)
    ids = tok.encode(SPECIAL_TEXT, "all")
    assert ids == library_ids(qwen_lib, SPECIAL_TEXT)
    assert tok.special_tokens["<|im_end|>"] in ids
    assert tok.encode_batch([SPECIAL_TEXT, "hi"], "all") == [ids, tok.encode("hi")]


def test_disallowed_specials_are_ordinary_text(lib):
    tok = HFTokenizer.from_tokenizer(lib)
    text = "a <|im_end|> b <end_of_turn><bos>" if "<bos>" in tok.special_tokens else SPECIAL_TEXT
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text
    assert ids == library_ids(lib, text, split_specials=True)  # transformers' split_special_tokens=True
    assert tok.encode_batch([text, text]) == [ids, ids]


def test_only_the_allowed_specials_are_matched(qwen_lib):
    tok = HFTokenizer.from_tokenizer(qwen_lib)
    ids = tok.encode(SPECIAL_TEXT, {"<|im_end|>"})
    end = tok.special_tokens["<|im_end|>"]
    assert ids.count(end) == 1
    assert tok.special_tokens["<|im_start|>"] not in ids and tok.special_tokens["<|endoftext|>"] not in ids
    before, after = SPECIAL_TEXT.split("<|im_end|>")
    assert ids == [*tok.encode(before), end, *tok.encode(after)]
    assert tok.decode(ids) == SPECIAL_TEXT
    assert tok.encode(SPECIAL_TEXT, "<|im_end|>") == ids  # one special by its string
    with pytest.raises(ScratchLLMError, match="unknown special"):
        tok.encode("x", {"<|nope|>"})


def test_non_special_added_tokens_are_always_matched(qwen_lib):
    tok = HFTokenizer.from_tokenizer(qwen_lib)
    assert "<think>" not in tok.special_tokens
    assert tok.encode("<think>x") == [qwen_lib.token_to_id("<think>"), *tok.encode("x")]


def test_encoding_ignores_truncation_and_padding_in_the_file(qwen_lib):
    lib = tokenizers.Tokenizer.from_str(qwen_lib.to_str())
    lib.enable_truncation(max_length=3)
    lib.enable_padding(length=50)
    tok = HFTokenizer.from_tokenizer(lib)
    assert tok.encode(TEXTS[2]) == library_ids(qwen_lib, TEXTS[2])
    assert tok.encode(SPECIAL_TEXT, "all") == library_ids(qwen_lib, SPECIAL_TEXT)


def test_lone_surrogates_become_replacement_characters(qwen_lib):
    tok = HFTokenizer.from_tokenizer(qwen_lib)
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")
    assert tok.encode_batch(["a\ud800b"]) == [tok.encode("a\ufffdb")]


def test_encode_takes_text_only(qwen_lib):
    tok = HFTokenizer.from_tokenizer(qwen_lib)
    with pytest.raises(ScratchLLMError, match="takes a str"):
        tok.encode(b"bytes")
    with pytest.raises(ScratchLLMError, match="list of texts"):
        tok.encode_batch("one text")


# -- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [*TEXTS, SPECIAL_TEXT])
def test_decode_round_trip(lib, text):
    tok = HFTokenizer.from_tokenizer(lib)
    ids = tok.encode(text, "all")
    assert tok.decode(ids) == text
    assert tok.decode(ids) == lib.decode(ids, skip_special_tokens=False)
    assert tok.decode_bytes(ids) == text.encode("utf-8")


@pytest.mark.parametrize("decoder", ["gemma", "llama2", "metaspace", "none"])
@pytest.mark.parametrize("prepend_scheme", ["never", "first"])
def test_sentencepiece_decoders_follow_the_library(decoder, prepend_scheme):
    lib = sentencepiece_like(decoder, prepend_scheme)
    tok = HFTokenizer.from_tokenizer(lib)
    for text in [*TEXTS, " lead", "the user <end_of_turn>  x"]:
        ids = tok.encode(text, "all")
        assert tok.decode(ids) == lib.decode(ids, skip_special_tokens=False), (text, ids)


def test_prefix_bytes_are_the_true_bytes(lib):
    """Streaming decodes prefixes: each one's bytes must be a prefix of the text's, also mid-character."""
    tok = HFTokenizer.from_tokenizer(lib)
    text = "wörld 𝄞 日本 😀!"
    data = text.encode("utf-8")
    ids = tok.encode(text)
    prefixes = [tok.decode_bytes(ids[:k]) for k in range(len(ids) + 1)]
    assert all(data.startswith(p) for p in prefixes)
    assert any(not _valid_utf8(p) for p in prefixes)  # some prefix ends inside a character
    assert prefixes[-1] == data


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_decode_takes_numpy_and_tensor_ids(lib):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    tok = HFTokenizer.from_tokenizer(lib)
    ids = tok.encode(TEXTS[2])
    assert tok.decode(np.array(ids)) == tok.decode(torch.tensor(ids)) == tok.decode(tuple(ids)) == TEXTS[2]


def test_decode_refuses_bad_ids(lib):
    tok = HFTokenizer.from_tokenizer(lib)
    for bad in ([tok.vocab_size], [-1], [1.5], [None]):
        with pytest.raises(ScratchLLMError, match="not in the vocabulary"):
            tok.decode(bad)
    with pytest.raises(ScratchLLMError, match="token ids"):
        tok.decode("text")


# -- settings from the files ------------------------------------------------------------------------


def test_llama3_style_settings(tmp_path):
    lib = byte_level(llama_post_processor=True)
    directory = write_hf_dir(
        tmp_path / "llama",
        lib,
        config={
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "chat_template": "{{ bos_token }}",
        },
        generation={"eos_token_id": [lib.token_to_id("<|endoftext|>"), lib.token_to_id("<|eot_id|>")]},
    )
    tok = HFTokenizer.from_dir(directory)
    bos, eot = lib.token_to_id("<|begin_of_text|>"), lib.token_to_id("<|eot_id|>")
    assert tok.name == "llama"
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) == (bos, eot, None, eot)
    assert tok.add_bos  # from the post-processor
    assert tok.stop_ids == [eot, lib.token_to_id("<|endoftext|>")]
    assert tok.encode("hi") == library_ids(lib, "hi")  # encode never adds BOS
    assert tok.encode_prompt("hi") == lib.encode("hi").ids == [bos, *tok.encode("hi")]


def test_qwen_style_settings(tmp_path, qwen_lib):
    config = {
        "bos_token": None,
        "eos_token": {"content": "<|im_end|>", "special": True},
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
    }
    tok = HFTokenizer.from_dir(write_hf_dir(tmp_path / "qwen", qwen_lib, config=config))
    end = qwen_lib.token_to_id("<|im_end|>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) == (
        None,
        end,
        qwen_lib.token_to_id("<|endoftext|>"),
        end,
    )
    assert not tok.add_bos and tok.encode_prompt("hi") == tok.encode("hi")
    assert tok.stop_ids == [end]
    assert tok.chat_template is None
    with pytest.raises(ScratchLLMError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_gemma_style_settings(tmp_path, gemma_lib):
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True}
    tok = HFTokenizer.from_dir(
        write_hf_dir(tmp_path / "gemma", gemma_lib, config=config, generation={"eos_token_id": [1, 107]})
    )
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    assert tok.stop_ids == [1, 107]
    assert tok.encode_prompt("hello") == [2, *tok.encode("hello")] == gemma_lib.encode("hello").ids


def test_config_add_bos_token_wins_over_the_post_processor(tmp_path):
    lib = byte_level(llama_post_processor=True)
    tok = HFTokenizer.from_dir(write_hf_dir(tmp_path / "d", lib, config={"add_bos_token": False}))
    assert tok.bos_token == "<|begin_of_text|>" and not tok.add_bos


def test_special_tokens_map_fills_what_the_config_leaves_unset(tmp_path, qwen_lib):
    directory = write_hf_dir(tmp_path, qwen_lib, config={"eos_token": "<|im_end|>"})
    older = {"eos_token": "<|endoftext|>", "pad_token": {"content": "<|endoftext|>", "special": True}}
    (directory / "special_tokens_map.json").write_text(json.dumps(older), encoding="utf-8")
    tok = HFTokenizer.from_dir(directory)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)


def test_chat_template_forms(tmp_path, qwen_lib):
    listed = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    assert HFTokenizer.from_dir(write_hf_dir(tmp_path / "a", qwen_lib, config=listed)).chat_template == "D"
    in_file = write_hf_dir(tmp_path / "b", qwen_lib, config={"chat_template": "old"}, template_file="new")
    assert HFTokenizer.from_dir(in_file).chat_template == "new"


def test_chat_helpers(qwen_lib):
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    template += "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    tok = HFTokenizer.from_tokenizer(qwen_lib, eos_token="<|im_end|>", chat_template=template)
    messages = [{"role": "user", "content": "hi <|im_end|>"}]
    text = tok.apply_chat_template(messages)
    assert text == "<|im_start|>user\nhi <|im_end|><|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode_chat(messages) == library_ids(qwen_lib, text)
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("<|im_end|>\n")


# -- files ----------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    lib = byte_level(llama_post_processor=True)
    tok = HFTokenizer.from_tokenizer(
        lib,
        name="llama-ish",
        eos_token="<|eot_id|>",
        pad_token="<|endoftext|>",
        chat_template="{{ bos_token }}{{ messages[0].content }}",
        generation_eos_ids=[lib.token_to_id("<|endoftext|>")],
    )
    back = load_tokenizer(tok.save(tmp_path / "saved"))
    assert isinstance(back, HFTokenizer)
    assert back.name == "llama-ish"
    for text in [*TEXTS, SPECIAL_TEXT]:
        assert back.encode(text) == tok.encode(text)
        assert back.encode(text, "all") == tok.encode(text, "all")
    assert back.special_tokens == tok.special_tokens
    assert (back.bos_id, back.eos_id, back.pad_id, back.add_bos) == (tok.bos_id, tok.eos_id, tok.pad_id, True)
    assert back.chat_template == tok.chat_template
    assert back.stop_ids == tok.stop_ids == [lib.token_to_id("<|eot_id|>"), lib.token_to_id("<|endoftext|>")]
    assert back.vocab_size == tok.vocab_size == lib.get_vocab_size()
    assert back.fingerprint() == tok.fingerprint()
    assert load_tokenizer(tmp_path / "saved" / "tokenizer.json").fingerprint() == tok.fingerprint()


def test_saved_directory_loads_in_transformers(tmp_path, qwen_lib):
    transformers = require_transformers()
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}"
    tok = HFTokenizer.from_tokenizer(qwen_lib, eos_token="<|im_end|>", chat_template=template)
    theirs = transformers.AutoTokenizer.from_pretrained(tok.save(tmp_path / "saved"))
    messages = [{"role": "user", "content": "héllo"}]
    assert theirs.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages)
    assert theirs.encode(SPECIAL_TEXT, add_special_tokens=False) == tok.encode(SPECIAL_TEXT, "all")


def test_pickle_round_trip(lib):
    """Worker processes may receive a tokenizer by pickle."""
    tok = HFTokenizer.from_tokenizer(lib, chat_template="{{ messages[0].content }}")
    tok.encode("warm the plain encoder")
    back = pickle.loads(pickle.dumps(tok))
    for text in [*TEXTS, SPECIAL_TEXT]:
        assert back.encode(text) == tok.encode(text) and back.encode(text, "all") == tok.encode(text, "all")
        assert back.decode_bytes(tok.encode(text)) == text.encode("utf-8")
    assert back.fingerprint() == tok.fingerprint() and back.chat_template == tok.chat_template


def test_fingerprint_follows_what_decides_the_ids(qwen_lib):
    tok = HFTokenizer.from_tokenizer(qwen_lib, eos_token="<|im_end|>")
    assert HFTokenizer.from_tokenizer(qwen_lib, eos_token="<|im_end|>", chat_template="x").fingerprint() == (
        tok.fingerprint()
    )
    more = tokenizers.Tokenizer.from_str(qwen_lib.to_str())
    more.add_special_tokens(["<|new|>"])
    others = [
        HFTokenizer.from_tokenizer(more, eos_token="<|im_end|>"),  # one more special
        HFTokenizer.from_tokenizer(byte_level(vocab_size=300), eos_token="<|im_end|>"),  # another vocabulary
        HFTokenizer.from_tokenizer(qwen_lib, eos_token="<|endoftext|>"),  # another document separator
    ]
    assert len({tok.fingerprint(), *(t.fingerprint() for t in others)}) == 4


def test_load_tokenizer_reads_a_plain_hugging_face_directory(tmp_path, gemma_lib):
    directory = write_hf_dir(
        tmp_path / "gemma-3-tiny",
        gemma_lib,
        config={"bos_token": "<bos>", "eos_token": "<eos>", "chat_template": "{{ bos_token }}"},
        generation={"eos_token_id": 107},
    )
    (directory / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}), encoding="utf-8")
    for spec in (directory, directory / "tokenizer.json", str(directory)):
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        assert (
            tok.name == "gemma-3-tiny" and tok.stop_ids == [1, 107] and tok.chat_template == "{{ bos_token }}"
        )
        assert tok.encode(TEXTS[2]) == library_ids(gemma_lib, TEXTS[2])


# -- errors ---------------------------------------------------------------------------------------


def test_missing_or_damaged_tokenizer_json(tmp_path, qwen_lib):
    with pytest.raises(ScratchLLMError, match=r"no tokenizer\.json"):
        HFTokenizer.from_dir(tmp_path)
    with pytest.raises(ScratchLLMError, match="not found"):
        HFTokenizer.from_files(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text('{"model": ', encoding="utf-8")
    with pytest.raises(ScratchLLMError, match="not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nope"}}', encoding="utf-8")
    with pytest.raises(ScratchLLMError, match="library can read"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ScratchLLMError, match="cannot read"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ("not json", "not valid JSON"),
        ([], "JSON object"),
        ({"eos_token": 5}, "eos_token must be a token string"),
        ({"pad_token": {"content": 1}}, "pad_token must be a token string"),
        ({"add_bos_token": "yes"}, "add_bos_token must be true or false"),
        ({"chat_template": 3}, "chat_template must be a string"),
        ({"eos_token": "<|not-a-token|>"}, "not in the tokenizer's vocabulary"),
    ],
)
def test_bad_tokenizer_config(tmp_path, qwen_lib, config, match):
    directory = write_hf_dir(tmp_path, qwen_lib)
    text = config if isinstance(config, str) else json.dumps(config)
    (directory / "tokenizer_config.json").write_text(text, encoding="utf-8")
    with pytest.raises(ScratchLLMError, match=match) as info:
        load_tokenizer(directory)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("generation", [{"eos_token_id": "2"}, {"eos_token_id": [1, -1]}, [1]])
def test_bad_generation_config(tmp_path, qwen_lib, generation):
    directory = write_hf_dir(tmp_path, qwen_lib, generation=generation)
    with pytest.raises(ScratchLLMError, match="generation"):
        load_tokenizer(directory)
