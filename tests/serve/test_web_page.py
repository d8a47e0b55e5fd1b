"""The web chat page of `scratchllm serve` in a real browser: headless Chromium driven by Playwright,
against a real server on a loopback port. Replies stream in several pieces, Stop and New chat work,
the settings are sent (a greedy reply equals the API's), model output is shown as text and never
run as HTML, the page asks for the API key, and a busy server or a conversation that outgrows the
context window gets a clear message.

Most tests serve "rule models": real model directories whose weights are set by hand so that the
next token depends on the last one only, by a table. One recites a sentence forever (long answers
known in advance), one answers with a special token whose text is HTML.

SCRATCHLLM_SCREENSHOT=docs/images/chat-page.png writes the README's screenshot (with
SCRATCHLLM_SCREENSHOT_MODEL=DIR, of a conversation with that model).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F

from scratchllm.checkpoint import save_model
from scratchllm.model.gpt import GPTConfig, GPTModel
from scratchllm.serve.app import create_app
from scratchllm.serve.chat import ChatModel, load_chat_model
from scratchllm.serve.page import ASSETS
from scratchllm.serve.server import served_model_name
from scratchllm.text.bpe import train_bpe
from scratchllm.text.tokenizer import EOT
from tests.serve.helpers import BackgroundServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "sk-page-test"
SENTENCE = " The quick brown fox jumps over the lazy dog."
# fox's context, and a reply long enough that it cannot end before a test stops it (a step takes well
# under a millisecond, so 3,000 tokens could end between the first text and a click)
FOX_CONTEXT, LONG_REPLY = 65_536, 60_000
PAYLOAD = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script><b>bold</b>'


# ----------------------------------------------------------------------------------------------
# Rule models


def rule_model(vocab_size: int, rules: dict[int, int], default: int, context_length: int) -> GPTModel:
    """A GPT whose next token is `rules[last token]`, or `default` for any other last token.

    The blocks add nothing (their output projections are zero) and positions are ignored, so the
    final norm sees the last token's embedding: a one-hot vector, one slot per token of `rules`
    and slot 0 for all the others. The head's row of each next token is the normed one-hot of the
    slots that lead to it, which beats every other row by about emb_dim in the logits."""
    dim = 64
    slots = {token: i + 1 for i, token in enumerate(rules)}
    cfg = GPTConfig(
        vocab_size=vocab_size,
        context_length=context_length,
        emb_dim=dim,
        n_heads=4,
        n_layers=1,
        drop_rate=0.0,
        tie_weights=False,
    )
    model = GPTModel(cfg).eval()
    writes = ("att.out_proj.weight", "att.out_proj.bias", "ff.layers.2.weight", "ff.layers.2.bias")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(writes):
                p.zero_()
        model.pos_emb.weight.zero_()
        one_hot = torch.eye(dim)
        model.tok_emb.weight.copy_(one_hot[[slots.get(t, 0) for t in range(vocab_size)]])
        normed = F.layer_norm(one_hot, (dim,))
        model.out_head.weight.zero_()
        model.out_head.weight[default] += normed[0]
        for token, following in rules.items():
            model.out_head.weight[following] += normed[slots[token]]
    return model


@pytest.fixture(scope="module")
def rule_tokenizer():
    """Whole words of SENTENCE as tokens (290 learned), then <|endoftext|> and PAYLOAD as specials."""
    return train_bpe([SENTENCE * 50], vocab_size=292, special_tokens=(EOT, PAYLOAD), progress=False)


@pytest.fixture(scope="module")
def fox(tmp_path_factory: pytest.TempPathFactory, rule_tokenizer) -> ChatModel:
    """Recites SENTENCE over and over, whatever it is asked."""
    cycle = rule_tokenizer.encode(SENTENCE)
    assert len(set(cycle)) == len(cycle) == 10  # each word one token, no token twice
    rules = {t: cycle[(i + 1) % len(cycle)] for i, t in enumerate(cycle)}
    model = rule_model(rule_tokenizer.vocab_size, rules, cycle[0], context_length=FOX_CONTEXT)
    directory = save_model(tmp_path_factory.mktemp("models") / "fox", model, rule_tokenizer)
    return load_chat_model(str(directory), device="cpu", dtype="fp32")


def recited(tokens: int) -> str:
    """What `fox` answers in `tokens` tokens (a reply is stripped of surrounding whitespace)."""
    words = SENTENCE.replace(".", " .").split()
    pieces = [(" " if w != "." else "") + w for w in words]
    return "".join(pieces[i % len(pieces)] for i in range(tokens)).strip()


@pytest.fixture(scope="module")
def html_model(tmp_path_factory: pytest.TempPathFactory, rule_tokenizer) -> ChatModel:
    """Answers PAYLOAD (one token), then ends the text."""
    payload = rule_tokenizer.special_tokens[PAYLOAD]
    model = rule_model(rule_tokenizer.vocab_size, {payload: rule_tokenizer.eot_id}, payload, 256)
    directory = save_model(tmp_path_factory.mktemp("models") / "html", model, rule_tokenizer)
    return load_chat_model(str(directory), device="cpu", dtype="fp32")


# ----------------------------------------------------------------------------------------------
# Servers and the browser


@contextlib.contextmanager
def serving(chat: ChatModel, name: str, **settings) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(chat, model_name=name, **settings)) as server:
        yield server


@pytest.fixture(scope="module")
def fox_server(fox):
    with serving(fox, "fox") as server:
        yield server


@pytest.fixture(scope="module")
def tiny_chat(model_dir: Path) -> ChatModel:
    return load_chat_model(str(model_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def tiny_server(tiny_chat):
    with serving(tiny_chat, "tiny") as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the browser tests need Playwright (pip install playwright)"
    )
    if not Path(CHROMIUM).exists():
        pytest.skip(f"the browser tests need Chromium, not found at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    context.set_default_timeout(20_000)
    tab = context.new_page()
    tab.errors = []  # uncaught errors of the page's script
    tab.on("pageerror", lambda error: tab.errors.append(error))
    yield tab
    context.close()
    assert not tab.errors, tab.errors


def open_chat(page, server: BackgroundServer) -> None:
    response = page.goto(server.url + "/")
    assert response.status == 200
    page.wait_for_selector("#send:enabled")


def chat_requests(page) -> list[dict]:
    """The bodies of the page's chat requests, as they are sent from now on."""
    bodies: list[dict] = []

    def record(request) -> None:
        if request.url.endswith("/v1/chat/completions"):
            bodies.append(request.post_data_json)

    page.on("request", record)
    return bodies


def set_field(page, selector: str, value: object) -> None:
    page.fill(selector, str(value))


def send(page, text: str, wait: bool = True) -> None:
    """Type a message and press Enter; with `wait`, until the reply is complete."""
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    if wait:
        wait_until_answered(page)


def wait_until_answered(page) -> None:
    page.wait_for_function(
        "() => document.getElementById('stop').hidden && !document.querySelector('.message.pending')"
    )


def replies(page) -> list[str]:
    return page.locator(".message.assistant").all_text_contents()


# ----------------------------------------------------------------------------------------------
# Tests


def test_the_page_and_its_files_are_served_without_a_key(tiny_chat):
    for name in ["chat.html", *ASSETS]:  # shipped as package data
        text = (resources.files("scratchllm.serve") / "static" / name).read_text()
        assert "http://" not in text and "https://" not in text  # nothing from elsewhere: works offline
    app = create_app(tiny_chat, model_name="tiny", api_key=KEY)
    with BackgroundServer(app) as server:
        page = httpx.get(server.url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert 'src="static/chat.js"' in page.text
        script = httpx.get(server.url + "/static/chat.js")
        assert script.status_code == 200 and "text/javascript" in script.headers["content-type"]
        assert "textContent" in script.text and "innerHTML" not in script.text
        assert httpx.get(server.url + "/static/chat.css").status_code == 200
        missing = httpx.get(server.url + "/static/secrets.txt")
        assert missing.status_code == 404 and "chat.js" in missing.json()["error"]["message"]
        assert httpx.get(server.url + "/v1/models").status_code == 401  # the API still needs the key


def test_a_reply_streams_in_pieces_and_the_conversation_goes_on(page, fox_server):
    bodies = chat_requests(page)
    open_chat(page, fox_server)
    assert page.text_content("#model") == f"fox · context {FOX_CONTEXT} tokens"  # from GET /v1/models
    page.evaluate(
        """() => {
            window.seen = [];
            new MutationObserver(() => {
                const replies = document.querySelectorAll('.message.assistant');
                if (replies.length) window.seen.push(replies[replies.length - 1].textContent);
            }).observe(document.getElementById('transcript'),
                       {childList: true, subtree: true, characterData: true});
        }"""
    )
    set_field(page, "#max-tokens", 400)
    send(page, "Tell me about foxes.")
    assert replies(page) == [recited(400)]
    assert "cut" in page.get_attribute(".message.assistant", "class")  # marked: max tokens ended it
    seen = [s for s in dict.fromkeys(page.evaluate("window.seen")) if s]
    assert len(seen) >= 3, f"the reply came in {len(seen)} piece(s), not streamed"
    assert all(recited(400).startswith(s) for s in seen)  # each a longer prefix of the reply

    set_field(page, "#max-tokens", 4)
    send(page, "And then?")
    assert replies(page) == [recited(400), recited(4)]
    assert page.locator(".message.user").all_text_contents() == ["Tell me about foxes.", "And then?"]
    assert bodies[1]["messages"] == [
        {"role": "user", "content": "Tell me about foxes."},
        {"role": "assistant", "content": recited(400)},
        {"role": "user", "content": "And then?"},
    ]
    assert bodies[1]["stream"] is True and bodies[1]["model"] == "fox"
    assert f"of the {FOX_CONTEXT}-token context" in page.text_content("#usage")


def test_stop_ends_a_long_reply_and_frees_the_model(page, fox_server):
    bodies = chat_requests(page)
    open_chat(page, fox_server)
    set_field(page, "#max-tokens", LONG_REPLY)
    send(page, "Recite it all.", wait=False)
    page.wait_for_function("() => document.querySelector('.message.assistant')?.textContent.length > 50")
    page.click("#stop")
    wait_until_answered(page)
    [stopped] = replies(page)
    time.sleep(0.3)
    assert replies(page) == [stopped]  # nothing arrives after Stop
    assert stopped.startswith("The quick brown fox") and len(stopped) < len(recited(LONG_REPLY)) // 2
    assert recited(LONG_REPLY).startswith(stopped)
    assert "stopped" in page.get_attribute(".message.assistant", "class")

    set_field(page, "#max-tokens", 3)
    started = time.monotonic()
    send(page, "Just three words.")  # answered at once: the server stopped generating the long one
    assert time.monotonic() - started < 10
    assert replies(page) == [stopped, recited(3)]
    assert bodies[1]["messages"][1] == {"role": "assistant", "content": stopped}
    assert httpx.get(fox_server.url + "/health").json()["waiting"] == 0


def test_new_chat_forgets_the_conversation(page, fox_server):
    bodies = chat_requests(page)
    open_chat(page, fox_server)
    set_field(page, "#max-tokens", 5)
    send(page, "First question.")
    page.click("#new-chat")
    assert page.locator("#transcript > *").count() == 0
    send(page, "A fresh start.")
    assert replies(page) == [recited(5)]
    assert bodies[1]["messages"] == [{"role": "user", "content": "A fresh start."}]

    set_field(page, "#max-tokens", LONG_REPLY)  # New chat while a reply streams stops it
    send(page, "Go on and on.", wait=False)
    page.wait_for_function("() => document.querySelector('.message.assistant')?.textContent.length > 20")
    page.click("#new-chat")
    wait_until_answered(page)
    assert page.locator("#transcript > *").count() == 0 and page.input_value("#prompt") == ""
    set_field(page, "#max-tokens", 2)
    send(page, "Hello again.")
    assert bodies[-1]["messages"] == [{"role": "user", "content": "Hello again."}]


def test_the_settings_are_sent_and_a_greedy_reply_equals_the_apis(page, tiny_server):
    bodies = chat_requests(page)
    open_chat(page, tiny_server)
    assert page.text_content("#model") == "tiny · context 256 tokens"
    set_field(page, "#system", "You are terse.")
    set_field(page, "#temperature", 0)
    set_field(page, "#top-k", 5)
    set_field(page, "#top-p", 0.9)
    set_field(page, "#max-tokens", 12)
    send(page, "Name three primary colors.")
    [body] = bodies
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three primary colors."},
    ]
    settings = {"temperature": 0, "top_k": 5, "top_p": 0.9, "max_tokens": 12}
    assert body["messages"] == messages and {k: body[k] for k in settings} == settings
    api = httpx.post(
        tiny_server.url + "/v1/chat/completions", json={"model": "tiny", "messages": messages, **settings}
    ).json()
    reply = api["choices"][0]["message"]["content"]
    assert reply and replies(page) == [reply]

    set_field(page, "#top-p", "")  # an empty field is left out: the server's default
    send(page, "Again.")
    assert "top_p" not in bodies[1] and bodies[1]["top_k"] == 5


def test_model_output_is_shown_as_text_never_run_as_html(page, html_model):
    with serving(html_model, "html") as server:
        open_chat(page, server)
        title = page.title()
        send(page, PAYLOAD)  # the user's own message too
        page.wait_for_timeout(200)  # time for an onerror handler to run, were there one
        assert replies(page) == [PAYLOAD]
        assert page.locator(".message.user").all_text_contents() == [PAYLOAD]
        assert page.locator("#transcript img, #transcript script, #transcript b").count() == 0
        assert page.evaluate("window.pwned") is None and page.title() == title


def test_the_page_asks_for_the_api_key_and_sends_it(page, fox):
    with serving(fox, "fox", api_key=KEY) as server:
        sent = []

        def record(request) -> None:
            if request.url.endswith("/v1/chat/completions"):
                sent.append(request.headers)

        page.on("request", record)
        response = page.goto(server.url + "/")
        assert response.status == 200  # the page itself needs no key
        page.wait_for_selector("#key-form:visible")
        assert "needs an API key" in page.text_content("#status")
        assert page.is_disabled("#send")

        page.fill("#key-input", "wrong")
        page.press("#key-input", "Enter")
        page.wait_for_function("() => document.getElementById('status').textContent.includes('refused')")
        assert page.is_visible("#key-form")

        page.fill("#key-input", KEY)
        page.press("#key-input", "Enter")
        page.wait_for_selector("#send:enabled")
        assert page.is_hidden("#key-form") and page.text_content("#model").startswith("fox")
        set_field(page, "#max-tokens", 3)
        send(page, "Hello.")
        assert replies(page) == [recited(3)]
        assert sent[0]["authorization"] == f"Bearer {KEY}"
        assert KEY not in page.url
        assert page.evaluate("sessionStorage.getItem('scratchllm-api-key')") == KEY

        page.reload()  # the tab remembers it
        page.wait_for_selector("#send:enabled")
        assert page.is_hidden("#key-form")


def test_a_conversation_that_outgrows_the_context_is_told_so(page, tiny_server, tiny_chat):
    open_chat(page, tiny_server)
    set_field(page, "#max-tokens", 100)
    first = "The cat sat on the mat."
    while len(tiny_chat.encode_chat([{"role": "user", "content": first + " The cat sat on the mat."}])) < 140:
        first += " The cat sat on the mat."
    send(page, first)  # about 140 tokens + 100 fit the 256 of the context
    assert len(replies(page)) == 1 and page.is_hidden("#status")
    second = "What is the capital of France? " * 4
    send(page, second)  # the history, this and 100 more tokens do not
    status = page.text_content("#status")
    assert "no longer fits the model's context window of 256 tokens" in status and "new chat" in status
    assert "error" in page.get_attribute("#status", "class")
    assert len(replies(page)) == 1 and page.input_value("#prompt") == second.strip()  # given back

    page.click("#new-chat")
    assert page.is_hidden("#status")
    send(page, page.input_value("#prompt"))
    assert len(replies(page)) == 1 and page.is_hidden("#status")


def test_a_busy_server_is_told_so(page, fox):
    body = {
        "model": "fox",
        "messages": [{"role": "user", "content": "hog"}],
        "max_tokens": LONG_REPLY,
        "stream": True,
    }
    with serving(fox, "fox", max_batch_size=1) as server:  # one request at a time
        open_chat(page, server)
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as other:
            lines = other.iter_lines()
            while '"content": "The' not in next(lines):  # the model is on the other request now
                pass
            set_field(page, "#max-tokens", 3)
            send(page, "Me too.", wait=False)
            page.wait_for_selector("#status.busy")
            status = page.text_content("#status")
            assert "The model is busy: 1 request(s) waiting in the queue, yours included" in status
        wait_until_answered(page)  # the other client left, which freed the model
        assert replies(page) == [recited(3)] and page.is_hidden("#status")


def test_screenshot_of_a_conversation(page, fox, tmp_path):
    """The README's picture: SCRATCHLLM_SCREENSHOT=PATH writes it there too."""
    model_dir = os.environ.get("SCRATCHLLM_SCREENSHOT_MODEL")
    chat = load_chat_model(model_dir, device="cpu", dtype="fp32") if model_dir else fox
    with serving(chat, served_model_name(model_dir) if model_dir else "fox") as server:
        open_chat(page, server)
        set_field(page, "#max-tokens", 40)
        set_field(page, "#temperature", 0)
        for question in ["What is the plural form of 'mouse'?", "Translate 'family' into Italian."]:
            send(page, question)
        assert all(replies(page))
        shot = page.screenshot(path=str(tmp_path / "chat-page.png"))
        assert shot.startswith(b"\x89PNG")
        if target := os.environ.get("SCRATCHLLM_SCREENSHOT"):
            Path(target).write_bytes(shot)
