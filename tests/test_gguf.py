"""GGUF export, tested with llama.cpp's own reader (`gguf.GGUFReader`) and with llama.cpp itself through
llama-cpp-python: a tiny random model of every family, each with a tokenizer of another kind, is saved,
exported and loaded; llama.cpp tokenizes a text as we do, its logits match ours and its greedy tokens are
ours. Without llama-cpp-python those checks skip, and the reader checks still run."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scratchllm.checkpoint import LoadedModel, save_model
from scratchllm.cli import main
from scratchllm.errors import ScratchLLMError
from scratchllm.generation.sampling import generate_text_simple
from scratchllm.hub import export_gguf, load_model
from scratchllm.hub.gguf_export import write_gguf
from scratchllm.hub.gguf_modelfile import book_go_template, book_jinja_template
from scratchllm.model import parts
from scratchllm.model.registry import build_model, preset_config
from scratchllm.text.bpe import train_bpe
from scratchllm.text.char import CharTokenizer
from scratchllm.text.chat_template import render_chat
from scratchllm.text.gpt2 import load_gpt2_files
from scratchllm.text.hf_tokenizer import HFTokenizer
from scratchllm.text.templates import ALPACA, PHI3, TEMPLATE_KEY
from tests.conftest import exit_code, shared_file

tokenizers = pytest.importorskip("tokenizers")

try:
    import llama_cpp
    import llama_cpp.llama_cpp as llama_cpp_lib

    WHY_NOT = ""
except Exception as e:  # not installed, or its compiled library does not load on this machine
    llama_cpp = llama_cpp_lib = None
    WHY_NOT = f"llama-cpp-python cannot be imported ({type(e).__name__}: {e}); `make test` builds it"
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason=WHY_NOT)
TEXT = "The cat sat on the mat. A dog ran to the park, while birds sang in 2024!"
CORPUS = [
    "the cat sat on the mat and the dog ran to the park while birds sang in the trees",
    "You are terse. Name a bird. A wren. And a tree? An oak, 12 or 345 of them.",
] * 20
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
    "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


# ----------------------------------------------------------------------------------------------
# tokenizers of every kind GGUF carries


def qwen_tokenizer() -> HFTokenizer:
    """Byte-level BPE split by Qwen's regex (llama.cpp's "qwen2"), with ChatML and two stop tokens."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet)
    )
    ids = [tok.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
    return HFTokenizer.from_tokenizer(
        tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML, generation_eos_ids=ids
    )


def gemma_tokenizer() -> HFTokenizer:
    """SentencePiece-style BPE with byte fallback, as Gemma's tokenizer.json (llama.cpp's "llama" kind)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    trained = tokenizers.Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300))
    spec = json.loads(trained.to_str())["model"]
    pieces = [*specials, *(f"<0x{b:02X}>" for b in range(256)), *spec["vocab"]]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    merges = [tuple(m) for m in spec["merges"]]
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    return HFTokenizer.from_tokenizer(
        tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", add_bos=True, chat_template=GEMMA_CHAT,
        generation_eos_ids=[tok.token_to_id("<end_of_turn>")],
    )  # fmt: skip


def gpt2_tokenizer():
    return load_gpt2_files(shared_file("encoder.json").parent)


def bpe_tokenizer(pattern: str = "gpt2"):
    return train_bpe(CORPUS, 320, pattern=pattern, progress=False)


LLAMA3_SCALING = dict(
    type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context_length=16
)
# Per family: llama.cpp's name for it, its tokenizer, the config's changes from the nano size (each
# family's RoPE variant, Gemma's window short enough to slide over the text), what the model directory
# saves besides, the pre-tokenizer that llama.cpp gets, and a line of the Modelfile's template
FAMILIES = {
    "gpt2": dict(gguf="gpt2", tokenizer=gpt2_tokenizer, pre="gpt-2", template="{{ .Prompt }}"),
    "llama3": dict(
        gguf="llama",
        tokenizer=lambda: bpe_tokenizer("gpt4"),
        config=dict(rope_scaling=LLAMA3_SCALING),
        pre="llama-bpe",
        template="{{ .Prompt }}",
    ),
    "qwen3": dict(
        gguf="qwen3",
        tokenizer=qwen_tokenizer,
        config=dict(rope_scaling=dict(type="linear", factor=2.0)),
        pre="qwen2",
        template="<|im_start|>",
    ),
    "qwen3-moe": dict(
        gguf="qwen3moe",
        tokenizer=bpe_tokenizer,
        extra={TEMPLATE_KEY: "alpaca"},
        pre="gpt-2",
        template="### Instruction:",
    ),
    "gemma3": dict(
        gguf="gemma3",
        tokenizer=gemma_tokenizer,
        config=dict(
            rope_base=1e6,
            rope_scaling=dict(type="linear", factor=4.0),
            rope_local_base=500.0,
            sliding_window=6,
        ),
        pre="default",
        template="<start_of_turn>",
    ),
}


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere, norms included (near 1, or near 0 for Gemma's offsets from 1), so that a
    weight in the wrong place shows."""
    torch.manual_seed(0)
    offsets = getattr(model.cfg, "norm_unit_offset", False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = "norm" in name and name.endswith((".weight", ".scale")) and not offsets
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if scale else 0.0))
    return model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple[str, Path, LoadedModel]:
    """(family, its model directory, the model loaded back) for a tiny random model of each family."""
    arch = request.param
    spec = FAMILIES[arch]
    tokenizer = spec["tokenizer"]()
    cfg = preset_config(
        "nano", arch, vocab_size=tokenizer.vocab_size, drop_rate=0.0, **spec.get("config", {})
    )
    directory = save_model(
        tmp_path_factory.mktemp(arch) / "model", randomize(build_model(cfg)), tokenizer, spec.get("extra")
    )
    return arch, directory, load_model(directory)


@pytest.fixture(scope="module")
def f32_file(family) -> Path:
    """The family's model exported in f32, with its Modelfile beside it."""
    _, directory, _ = family
    return export_gguf(directory, directory.parent / "f32" / "m.gguf", dtype="f32")


# ----------------------------------------------------------------------------------------------
# llama.cpp's reader: metadata, names, shapes, types and values


def read(path: Path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> ReaderTensor) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def values(tensor) -> np.ndarray:
    """A tensor's values as floats in PyTorch's shape (GGUF lists its dimensions the other way round)."""
    data = gguf.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape([int(n) for n in reversed(tensor.shape)])


def test_the_file_holds_the_metadata_and_the_weights_of_every_family(family, f32_file):
    arch, _, loaded = family
    cfg, ours = loaded.model.cfg, loaded.model.state_dict()
    meta, tensors = read(f32_file)
    name = FAMILIES[arch]["gguf"]
    assert meta["general.architecture"] == name
    assert meta[f"{name}.block_count"] == cfg.n_layers and meta[f"{name}.embedding_length"] == cfg.emb_dim
    assert meta[f"{name}.context_length"] == cfg.context_length
    assert meta["tokenizer.ggml.pre"] == FAMILIES[arch]["pre"]
    assert len(meta["tokenizer.ggml.tokens"]) == cfg.vocab_size
    own = getattr(loaded.tokenizer, "chat_template", None)
    want = book_jinja_template(ALPACA) if arch == "qwen3-moe" else own  # finetuned with alpaca
    assert meta.get("tokenizer.chat_template") == want
    assert {t.tensor_type for t in tensors.values()} == {gguf.GGMLQuantizationType.F32}
    assert ("output.weight" in tensors) == (not loaded.model.weights_tied)
    np.testing.assert_array_equal(values(tensors["token_embd.weight"]), ours["tok_emb.weight"].numpy())
    if arch == "gpt2":
        qkv = values(tensors["blk.1.attn_qkv.weight"])
        np.testing.assert_array_equal(qkv, ours["trf_blocks.1.att.qkv.weight"].numpy())  # nn.Linear: as is
        assert tensors["blk.1.attn_qkv.weight"].shape.tolist() == [cfg.emb_dim, 3 * cfg.emb_dim]  # ne0 = in
        return
    assert meta[f"{name}.attention.head_count_kv"] == cfg.n_kv_groups
    down = ours["trf_blocks.1.ff.experts.3.down.weight" if cfg.n_experts else "trf_blocks.1.ff.down.weight"]
    got = (
        values(tensors["blk.1.ffn_down_exps.weight"])[3]
        if cfg.n_experts
        else values(tensors["blk.1.ffn_down.weight"])
    )
    np.testing.assert_array_equal(got, down.numpy())
    v = ours["trf_blocks.0.att.qkv.weight"][-cfg.n_kv_groups * cfg.head_dim :]
    np.testing.assert_array_equal(values(tensors["blk.0.attn_v.weight"]), v.numpy())
    norm = ours["trf_blocks.0.norm1.weight"] + (1.0 if cfg.norm_unit_offset else 0.0)  # Gemma's 1 + w
    np.testing.assert_allclose(values(tensors["blk.0.attn_norm.weight"]), norm.numpy(), rtol=0, atol=1e-7)


def test_q8_0_blocks_dequantize_to_our_weights_and_short_rows_fall_back_to_f16(tmp_path):
    cfg = preset_config("nano", "llama3", vocab_size=320, hidden_dim=200)  # ffn_down's rows: 200 values
    model = randomize(build_model(cfg))
    tokenizer = bpe_tokenizer("gpt4")
    result = write_gguf(LoadedModel(model, tokenizer, cfg), tmp_path / "q.gguf", "q8_0")
    _, tensors = read(result.path)
    Q = gguf.GGMLQuantizationType
    assert (
        tensors["blk.0.ffn_up.weight"].tensor_type == Q.Q8_0
        and tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    )
    assert (
        tensors["blk.0.ffn_down.weight"].tensor_type == Q.F16 and "blk.0.ffn_down.weight" in result.notes[0]
    )
    up = model.state_dict()["trf_blocks.0.ff.up.weight"].numpy()
    step = np.abs(up.reshape(-1, 32)).max(axis=1, keepdims=True) / 127  # each block's scale
    err = np.abs(values(tensors["blk.0.ffn_up.weight"]).reshape(-1, 32) - up.reshape(-1, 32))
    assert (err <= step * 0.51 + 1e-4).all()  # half a step, and the scale's own f16 rounding


def test_a_padded_vocabulary_gets_unused_tokens(tmp_path):
    tokenizer = train_bpe(CORPUS, 300, progress=False)
    cfg = preset_config("nano", "gpt2", vocab_size=320)  # an embedding rounded up past the tokenizer
    path = export_gguf(LoadedModel(randomize(build_model(cfg)), tokenizer, cfg), tmp_path / "p.gguf", "f32")
    meta, _ = read(path)
    assert meta["tokenizer.ggml.tokens"][300:] == [f"[PAD{i}]" for i in range(300, 320)]
    assert set(meta["tokenizer.ggml.token_type"][300:]) == {gguf.TokenType.UNUSED}
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eot_id == 299


# ----------------------------------------------------------------------------------------------
# llama.cpp itself


@contextlib.contextmanager
def in_llama_cpp(path: Path) -> Iterator:
    """The file loaded by llama.cpp, on fp32 KV caches (its default f16 ones round keys and values)."""
    defaults = llama_cpp_lib.llama_model_default_params

    def plain_buffers():  # llama.cpp's AMX matmul of q8_0 crashes on some CPUs: the plain CPU path instead
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp_lib.llama_model_default_params = plain_buffers
    try:
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0
        )
    finally:
        llama_cpp_lib.llama_model_default_params = defaults
    try:
        yield llm
    finally:
        llm.close()


@contextlib.contextmanager
def ggml_gelu() -> Iterator[None]:
    """Our GELU computed as ggml's f32 GELU on a CPU is: a table lookup at the input rounded to f16."""

    def gelu(x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, 0.0, torch.where(x >= 10, x, y))

    saved = parts.ACTIVATIONS["gelu_tanh"], parts.GELU.forward
    parts.ACTIVATIONS["gelu_tanh"], parts.GELU.forward = gelu, lambda self, x: gelu(x)
    try:
        yield
    finally:
        parts.ACTIVATIONS["gelu_tanh"], parts.GELU.forward = saved


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    with in_llama_cpp(path) as llm:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])


def our_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad(), ggml_gelu():
        return model(torch.tensor([ids]))[0].numpy()


@needs_llama_cpp
def test_llama_cpp_tokenizes_as_we_do_and_gives_our_logits_and_greedy_tokens(family, f32_file):
    _, _, loaded = family
    tokenizer, model = loaded.tokenizer, loaded.model
    ids = tokenizer.encode(TEXT)
    with in_llama_cpp(f32_file) as llm:
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == ids
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
        greedy = []
        for token in llm.generate(ids, temp=0.0, reset=True):
            greedy.append(token)
            if len(greedy) == 8:
                break
    np.testing.assert_allclose(theirs, our_logits(model, ids), rtol=0, atol=1e-3)
    with ggml_gelu():
        ours = generate_text_simple(model, torch.tensor([ids]), 8, model.cfg.context_length)[0, len(ids) :]
    assert greedy == ours.tolist()


@needs_llama_cpp
def test_q8_0_gives_close_logits(family, tmp_path):
    """q8_0 rounds the weights to 8 bits per value, and llama.cpp rounds the activations the same way before
    each product: on these random models the logits (spread about 0.8) move by 0.16 at most."""
    arch, directory, loaded = family
    ids = loaded.tokenizer.encode(TEXT)
    theirs = llama_cpp_logits(export_gguf(directory, tmp_path / "m.gguf", dtype="q8_0"), ids)
    ours = our_logits(loaded.model, ids)
    error = np.abs(theirs - ours)
    assert error.max() < 0.3 * ours.std() and error.mean() < 0.04 * ours.std(), f"{arch}: {error.max():.4f}"


@needs_llama_cpp
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_gives_close_logits(dtype, tmp_path):
    tokenizer = bpe_tokenizer("gpt4")
    cfg = preset_config("nano", "qwen3", vocab_size=320)
    model = randomize(build_model(cfg))
    path = export_gguf(LoadedModel(model, tokenizer, cfg), tmp_path / "m.gguf", dtype=dtype)
    ids = tokenizer.encode(TEXT)
    error = np.abs(llama_cpp_logits(path, ids) - our_logits(model, ids)).max()
    assert error < {"f16": 0.02, "bf16": 0.15}[dtype]  # 3 and 8 bits fewer than fp32's 24: logits of +-3


# ----------------------------------------------------------------------------------------------
# the Modelfile


def test_the_modelfile_has_the_models_template_and_stops(family, f32_file):
    arch, _, _ = family
    text = (f32_file.parent / "Modelfile").read_text()
    assert "FROM ./m.gguf\n" in text and FAMILIES[arch]["template"] in text
    stops = [json.loads(line.removeprefix("PARAMETER stop ")) for line in text.splitlines() if "stop" in line]
    want = {
        "qwen3": ["<|im_end|>", "<|endoftext|>"],
        "gemma3": ["<end_of_turn>", "<eos>"],
        "qwen3-moe": list(ALPACA.stop_strings),
    }.get(arch, ["<|endoftext|>"])
    assert stops == want
    if arch == "qwen3-moe":
        assert f'SYSTEM """{ALPACA.default_system}"""' in text


def test_the_book_templates_read_as_go_templates():
    user = '{{ if eq .Role "user" }}{{ if or $.System $i }}\n\n{{ end }}### Instruction:\n{{ .Content }}'
    assert book_go_template(ALPACA) == (
        "{{ if .System }}{{ .System }}{{ end }}{{ range $i, $_ := .Messages }}"
        + user
        + '\n\n### Response:\n{{ else if eq .Role "assistant" }}{{ .Content }}{{ end }}{{ end }}'
    )


@pytest.mark.parametrize("template", [ALPACA, PHI3], ids=lambda t: t.name)
def test_the_book_templates_as_jinja_render_every_conversation_as_we_do(template):
    system, user, reply = (
        {"role": r, "content": c} for r, c in (("system", "Be terse."), ("user", "Hi"), ("assistant", "Yo"))
    )
    jinja = book_jinja_template(template)
    for messages in (
        [user],
        [system, user, reply, user],
        [{**system, "content": ""}, user],
        [system, user, system, reply],
    ):
        for generation_prompt in (True, False):
            want = template.render_chat(messages, add_generation_prompt=generation_prompt)
            assert render_chat(jinja, messages, add_generation_prompt=generation_prompt) == want


def test_a_modelfile_of_the_users_own_is_not_replaced(family, tmp_path):
    _, directory, _ = family
    (tmp_path / "Modelfile").write_text("FROM llama3\n")
    with pytest.raises(ScratchLLMError, match="not written by export-gguf"):
        export_gguf(directory, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


# ----------------------------------------------------------------------------------------------
# what GGUF cannot hold, said in one line


def test_what_cannot_be_exported_is_named(tmp_path):
    def export(arch: str, tokenizer=None, **settings):
        tokenizer = tokenizer or train_bpe(CORPUS, 300, progress=False)
        cfg = preset_config("nano", arch, **{"vocab_size": 300, **settings})
        export_gguf(LoadedModel(build_model(cfg), tokenizer, cfg), tmp_path / "x.gguf")

    chars = CharTokenizer.from_corpus("the cat sat")
    with pytest.raises(ScratchLLMError, match=r"char tokenizer .* has no GGUF form"):
        export("gpt2", chars)
    with pytest.raises(ScratchLLMError, match=r"regex .* is not one that llama.cpp knows"):
        export("gpt2", train_bpe(CORPUS, 300, pattern=r"\w+|\s+|[^\w\s]+", progress=False))
    with pytest.raises(ScratchLLMError, match="gelu 'exact'"):
        export("gpt2", gelu="exact")
    with pytest.raises(ScratchLLMError, match=r"query_scale 8.0"):
        export("gemma3", query_scale=8.0)
    with pytest.raises(ScratchLLMError, match="norm_topk_prob False"):
        export("qwen3-moe", norm_topk_prob=False)
    with pytest.raises(ScratchLLMError, match="classifier"):
        export("qwen3", n_classes=2)
    assert not list(tmp_path.iterdir())


def test_a_unigram_tokenizer_json_is_refused(tmp_path):
    from tokenizers import models

    tok = tokenizers.Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], unk_id=0))
    cfg = preset_config("nano", "llama3", vocab_size=3)
    with pytest.raises(ScratchLLMError, match=r"Unigram tokenizer.json has no GGUF form"):
        export_gguf(LoadedModel(build_model(cfg), HFTokenizer.from_tokenizer(tok), cfg), tmp_path / "x.gguf")


def test_the_command_writes_the_file_and_says_what_it_holds(tmp_path, capsys):
    tokenizer = train_bpe(CORPUS, 300, progress=False)
    cfg = preset_config("nano", "llama3", vocab_size=300)
    directory = save_model(tmp_path / "model", build_model(cfg), tokenizer)
    assert main(["export-gguf", str(directory), str(tmp_path / "m.gguf"), "--dtype", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "q8_0" in out and "f32" in out and "Modelfile" in out and (tmp_path / "m.gguf").is_file()
    assert (
        exit_code(main, ["export-gguf", str(directory), str(tmp_path / "m.gguf"), "--template", "nope"]) == 2
    )
