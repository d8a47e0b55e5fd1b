"""GPT-2's tokenizer from OpenAI's files (in ../shared/data), checked against tiktoken's own GPT-2
encoding built from the same ranks. No test touches the network: tiktoken's download is replaced."""

from __future__ import annotations

import json
import shutil

import pytest
import tiktoken
from hypothesis import given, settings
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

from scratchllm.errors import ScratchLLMError
from scratchllm.text import gpt2
from scratchllm.text.bpe import GPT2_PATTERN, BPETokenizer
from scratchllm.text.registry import load_tokenizer
from scratchllm.text.tokenizer import EOT
from tests.conftest import shared_file
from tests.text.test_bpe import MIXED_CORPUS, texts_with_specials

pytestmark = pytest.mark.usefixtures("no_gpt2_download")


@pytest.fixture(scope="module")
def gpt2_tiktoken_path():
    return shared_file("gpt2.tiktoken")


@pytest.fixture(scope="module")
def gpt2_openai_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2-openai")
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(shared_file(name), d / name)
    return d


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_tiktoken_path) -> BPETokenizer:
    return gpt2.load_gpt2_files(gpt2_tiktoken_path)


@pytest.fixture(scope="module")
def tiktoken_gpt2(gpt2_tiktoken_path):
    """tiktoken's `gpt2` encoding exactly as tiktoken defines it, from the local ranks file."""
    return tiktoken.Encoding(
        "gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=load_tiktoken_bpe(str(gpt2_tiktoken_path)),
        special_tokens={EOT: 50256},
        explicit_n_vocab=50257,
    )


def test_the_verdict_is_5145_tokens(gpt2_tok):
    text = shared_file("the-verdict.txt").read_text(encoding="utf-8")
    ids = gpt2_tok.encode(text)
    assert len(ids) == 5145
    assert gpt2_tok.decode(ids) == text


def test_books_example_ids(gpt2_tok):
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    expected = [
        15496,
        11,
        466,
        345,
        588,
        8887,
        30,
        220,
        50256,
        554,
        262,
        4252,
        18250,
        8812,
        2114,
        286,
        617,
        34680,
        27271,
        13,
    ]
    assert gpt2_tok.encode(text, allowed_special={EOT}) == expected
    assert gpt2_tok.reference_encode(text, allowed_special={EOT}) == expected


def test_gpt2_shape(gpt2_tok):
    assert gpt2_tok.name == "gpt2"
    assert gpt2_tok.vocab_size == 50257
    assert gpt2_tok.special_tokens == {EOT: 50256} and gpt2_tok.eot_id == 50256
    assert gpt2_tok.pattern == GPT2_PATTERN == r50k_pat_str


def test_reference_encoder_gives_tiktokens_gpt2_ids_on_a_mixed_corpus(gpt2_tok, tiktoken_gpt2):
    text = "\n".join(MIXED_CORPUS) + shared_file("the-verdict.txt").read_text(encoding="utf-8")[:5000]
    expected = tiktoken_gpt2.encode(text, disallowed_special=())
    assert gpt2_tok.reference_encode(text) == expected
    assert gpt2_tok.encode(text) == expected
    for doc in MIXED_CORPUS:
        expected = tiktoken_gpt2.encode(doc, allowed_special="all")
        assert gpt2_tok.reference_encode(doc, "all") == expected
        assert gpt2_tok.encode(doc, "all") == expected


@settings(max_examples=150, deadline=None)
@given(texts_with_specials())
def test_gpt2_is_lossless(gpt2_tok, tiktoken_gpt2, text):
    ids = gpt2_tok.encode(text)
    assert ids == tiktoken_gpt2.encode_ordinary(text)
    assert gpt2_tok.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(texts_with_specials(assigned_only=True))
def test_gpt2_reference_encoder_equals_tiktoken(gpt2_tok, tiktoken_gpt2, text):
    assert gpt2_tok.reference_encode(text) == tiktoken_gpt2.encode_ordinary(text)


def test_both_file_formats_load_the_same_ranks(gpt2_tok, gpt2_openai_dir, gpt2_tiktoken_path):
    from_openai = gpt2.load_gpt2_files(gpt2_openai_dir)
    assert (
        from_openai.mergeable_ranks == gpt2_tok.mergeable_ranks == load_tiktoken_bpe(str(gpt2_tiktoken_path))
    )
    assert from_openai.special_tokens == gpt2_tok.special_tokens == {EOT: 50256}
    assert from_openai.fingerprint() == gpt2_tok.fingerprint()


def test_saved_gpt2_files_equal_openais(gpt2_tok, gpt2_openai_dir, gpt2_tiktoken_path, tmp_path):
    # vocab.bpe is derived from the ranks alone here (the .tiktoken file has no merges)
    gpt2_tok.save(tmp_path)
    assert (tmp_path / "vocab.bpe").read_bytes() == (gpt2_openai_dir / "vocab.bpe").read_bytes()
    assert (tmp_path / "tokenizer.tiktoken").read_bytes() == gpt2_tiktoken_path.read_bytes()
    assert json.loads((tmp_path / "encoder.json").read_text(encoding="utf-8")) == json.loads(
        (gpt2_openai_dir / "encoder.json").read_text(encoding="utf-8")
    )
    assert load_tokenizer(tmp_path).fingerprint() == gpt2_tok.fingerprint()


def test_load_tokenizer_finds_gpt2_files(gpt2_tiktoken_path, gpt2_openai_dir):
    assert load_tokenizer(gpt2_tiktoken_path).vocab_size == 50257
    assert load_tokenizer(gpt2_openai_dir).vocab_size == 50257
    assert load_tokenizer(gpt2_openai_dir / "encoder.json").vocab_size == 50257


def test_load_gpt2_tokenizer_from_the_environment_variable(monkeypatch, gpt2_tiktoken_path, gpt2_openai_dir):
    monkeypatch.setenv(gpt2.ENV_VAR, str(gpt2_openai_dir))
    assert load_tokenizer("gpt2").encode("Hello world") == [15496, 995]
    monkeypatch.setenv(gpt2.ENV_VAR, str(gpt2_tiktoken_path))
    assert gpt2.load_gpt2_tokenizer().encode("Hello world") == [15496, 995]
    monkeypatch.setenv(gpt2.ENV_VAR, str(gpt2_tiktoken_path.parent / "nope"))
    with pytest.raises(ScratchLLMError, match="not found"):
        gpt2.load_gpt2_tokenizer()


def test_load_gpt2_tokenizer_from_the_cache_dir(gpt2_tiktoken_path):
    cache = gpt2.gpt2_cache_dir()
    cache.mkdir(parents=True)
    shutil.copy(gpt2_tiktoken_path, cache / "gpt2.tiktoken")
    assert gpt2.load_gpt2_tokenizer().vocab_size == 50257


def test_no_files_and_no_network_is_a_clear_error():
    with pytest.raises(ScratchLLMError) as e:
        gpt2.load_gpt2_tokenizer()
    message = str(e.value)
    assert "encoder.json + vocab.bpe" in message and gpt2.ENV_VAR in message and "no network" in message


def test_a_download_is_kept_for_offline_use(monkeypatch, tiktoken_gpt2):
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: tiktoken_gpt2)
    tok = gpt2.load_gpt2_tokenizer()
    assert tok.encoding is tiktoken_gpt2 and tok.name == "gpt2"
    assert (gpt2.gpt2_cache_dir() / "gpt2.tiktoken").exists()

    def no_network(name):
        raise ConnectionError("offline now")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    assert gpt2.load_gpt2_tokenizer().mergeable_ranks == tok.mergeable_ranks


def test_tiktoken_encoding_errors():
    with pytest.raises(ScratchLLMError, match=r"no encoding 'nope'; it knows .*cl100k_base"):
        load_tokenizer("tiktoken:nope")
    with pytest.raises(ScratchLLMError, match="cannot load tiktoken encoding 'cl100k_base': ConnectionError"):
        load_tokenizer("tiktoken:cl100k_base")  # get_encoding is replaced: no network


def test_bad_gpt2_files(tmp_path, gpt2_openai_dir):
    with pytest.raises(ScratchLLMError, match="expected GPT-2 tokenizer files"):
        gpt2.load_gpt2_files(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ScratchLLMError, match="is an empty file, not a tokenizer"):
        load_tokenizer(tmp_path / "empty.txt")
    (tmp_path / "encoder.json").write_text('{"a": 0}')
    shutil.copy(gpt2_openai_dir / "vocab.bpe", tmp_path / "vocab.bpe")
    with pytest.raises(ScratchLLMError, match="do not belong together"):
        gpt2.load_gpt2_files(tmp_path)
    (tmp_path / "encoder.json").write_text("not json")
    with pytest.raises(ScratchLLMError, match="as JSON"):
        gpt2.load_gpt2_files(tmp_path)
