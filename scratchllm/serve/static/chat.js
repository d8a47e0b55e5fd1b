// The chat page of `scratchllm serve`.
//
// The page is a client of the server's own OpenAI-compatible API, as any program could be:
//   GET  v1/models              the model's name and context length (`max_model_len`)
//   POST v1/chat/completions    the whole conversation, `stream: true`: the reply arrives as
//                               server-sent events, one `data: {json}` chunk per piece of text
//   GET  health                 how many requests wait for the model (`waiting`)
// The conversation lives here, in `state.messages`; every turn sends all of it again.
// Model output is only ever shown as text (`textContent`), never parsed as HTML.

"use strict";

const KEY_STORAGE = "scratchllm-api-key"; // sessionStorage: forgotten when the tab closes
const BUSY_POLL_MS = 500;

const $ = (id) => document.getElementById(id);
const page = {
  model: $("model"),
  newChat: $("new-chat"),
  transcript: $("transcript"),
  status: $("status"),
  keyForm: $("key-form"),
  keyInput: $("key-input"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  system: $("system"),
  temperature: $("temperature"),
  topK: $("top-k"),
  topP: $("top-p"),
  maxTokens: $("max-tokens"),
  usage: $("usage"),
};

const state = {
  model: null, // the served model's id
  contextLength: null,
  messages: [], // {role, content} of this chat, without the system prompt
  apiKey: sessionStorage.getItem(KEY_STORAGE),
  controller: null, // aborts the reply being streamed
};

// ---------------------------------------------------------------------------------------------
// The API

class APIError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers() {
  const out = { "Content-Type": "application/json" };
  if (state.apiKey) out.Authorization = `Bearer ${state.apiKey}`;
  return out;
}

// The server's error, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
async function errorOf(response) {
  try {
    const { error } = await response.json();
    return new APIError(response.status, error.message, error.code);
  } catch {
    return new APIError(response.status, `${response.status} ${response.statusText}`);
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers() });
  if (!response.ok) throw await errorOf(response);
  return response;
}

// Yields the JSON of each `data:` event of a server-sent event stream, until `data: [DONE]`.
async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  while (true) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) { // an event ends with a blank line
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The model and the API key

async function loadModel() {
  try {
    const { data } = await (await api("v1/models")).json();
    state.model = data[0].id;
    state.contextLength = data[0].max_model_len;
    page.model.textContent = `${state.model} · context ${state.contextLength} tokens`;
    page.keyForm.hidden = true;
    page.send.disabled = false;
    showStatus("");
  } catch (error) {
    page.model.textContent = "not connected";
    showError(error);
  }
}

function askForKey(message) {
  page.keyForm.hidden = false;
  page.keyInput.focus();
  showStatus(message, "error");
}

function saveKey(event) {
  event.preventDefault();
  state.apiKey = page.keyInput.value.trim();
  sessionStorage.setItem(KEY_STORAGE, state.apiKey);
  page.keyInput.value = "";
  loadModel();
}

// ---------------------------------------------------------------------------------------------
// What is shown

function showStatus(text, kind = "info") {
  page.status.textContent = text;
  page.status.className = kind;
  page.status.hidden = !text;
}

function showError(error) {
  if (error.status === 401) {
    const again = state.apiKey ? "That key was refused. " : "";
    askForKey(`${again}This server needs an API key (the one it was started with, --api-key).`);
  } else if (error.code === "context_length_exceeded") {
    showStatus(
      `The conversation no longer fits the model's context window of ${state.contextLength} tokens: ` +
        `start a new chat, write less, or lower Max tokens. (${error.message})`,
      "error",
    );
  } else if (error instanceof APIError) {
    const how = error.status ? `answered ${error.status}` : "reported an error";
    showStatus(`The server ${how}: ${error.message}`, "error");
  } else {
    showStatus(`Cannot reach the server (${error.message}). Is scratchllm serve still running?`, "error");
  }
}

function addMessage(role, text) {
  const bubble = document.createElement("div");
  bubble.className = `message ${role}`;
  bubble.textContent = text;
  page.transcript.append(bubble);
  bubble.scrollIntoView({ block: "end" });
  return bubble;
}

function showUsage(usage) {
  page.usage.textContent =
    `Last turn: ${usage.prompt_tokens} prompt and ${usage.completion_tokens} reply tokens ` +
    `of the ${state.contextLength}-token context.`;
}

function setAnswering(answering) {
  page.send.disabled = answering || state.model === null;
  page.stop.hidden = !answering;
}

// Until the first words of the reply arrive, tell the user when the model is busy with others.
function watchQueue() {
  let watching = true;
  const timer = setInterval(async () => {
    try {
      const health = await (await fetch("health")).json();
      if (watching && health.waiting > 0) {
        showStatus(
          `The model is busy: ${health.waiting} request(s) waiting in the queue, yours included. ` +
            "The reply starts when the model is free.",
          "busy",
        );
      }
    } catch {
      // the reply's own request reports a server that is gone
    }
  }, BUSY_POLL_MS);
  return function stopWatching() {
    if (!watching) return;
    watching = false;
    clearInterval(timer);
    if (page.status.className === "busy") showStatus("");
  };
}

// ---------------------------------------------------------------------------------------------
// One turn

// A number field's value, or undefined (left out of the request) when it is empty.
function numberIn(input) {
  return input.value.trim() === "" ? undefined : Number(input.value);
}

function requestBody(messages) {
  const system = page.system.value.trim();
  return {
    model: state.model,
    messages: system ? [{ role: "system", content: system }, ...messages] : messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: numberIn(page.temperature),
    top_k: numberIn(page.topK),
    top_p: numberIn(page.topP),
    max_tokens: numberIn(page.maxTokens),
  };
}

// Streams the reply into `bubble` and returns its text. Stop or an error midway throws, and the
// text so far stays in `bubble`. Each piece is appended (not the whole reply set again) and the view
// follows once per frame, so that a fast stream of a long reply leaves the page free to take a Stop.
async function streamReply(response, bubble, stopWatching) {
  let reply = "";
  let frame = 0;
  const shown = bubble.appendChild(document.createTextNode(""));
  const follow = () => {
    frame = 0;
    bubble.scrollIntoView({ block: "end" });
  };
  for await (const event of serverSentEvents(response)) {
    if (event.error) throw new APIError(null, event.error.message, event.error.code); // failed midway
    if (event.usage) showUsage(event.usage);
    const choice = event.choices?.[0];
    if (choice?.finish_reason === "length") bubble.classList.add("cut"); // ended by max tokens
    const piece = choice?.delta?.content;
    if (piece) {
      stopWatching();
      reply += piece;
      shown.appendData(piece);
      if (!frame) frame = requestAnimationFrame(follow);
    }
  }
  return reply;
}

async function send(text) {
  const messages = state.messages; // "New chat" replaces the array, so a late reply lands nowhere
  messages.push({ role: "user", content: text });
  const question = addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("pending");
  state.controller = new AbortController();
  const stopWatching = watchQueue();
  setAnswering(true);
  showStatus("");
  try {
    const response = await api("v1/chat/completions", {
      method: "POST",
      body: JSON.stringify(requestBody(messages)),
      signal: state.controller.signal,
    });
    const reply = await streamReply(response, bubble, stopWatching);
    messages.push({ role: "assistant", content: reply });
  } catch (error) {
    if (messages !== state.messages) return; // a new chat began meanwhile
    const stopped = error.name === "AbortError";
    if (bubble.textContent) { // stopped or broken off midway: the reply so far stays
      messages.push({ role: "assistant", content: bubble.textContent });
      if (stopped) bubble.classList.add("stopped");
    } else {
      takeBack(messages, question, bubble, text);
    }
    if (!stopped) showError(error);
  } finally {
    bubble.classList.remove("pending");
    stopWatching();
    state.controller = null;
    setAnswering(false);
  }
}

// A message that got no reply leaves the conversation and goes back into the input box.
function takeBack(messages, question, bubble, text) {
  messages.pop();
  question.remove();
  bubble.remove();
  if (!page.prompt.value) page.prompt.value = text;
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stop();
  state.messages = [];
  page.transcript.replaceChildren();
  page.usage.textContent = "";
  showStatus("");
  page.prompt.focus();
}

// ---------------------------------------------------------------------------------------------
// Wiring

function submit(event) {
  event.preventDefault();
  const text = page.prompt.value.trim();
  if (!text || state.controller || state.model === null) return;
  page.prompt.value = "";
  send(text);
}

page.composer.addEventListener("submit", submit);
page.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) submit(event);
});
page.stop.addEventListener("click", stop);
page.newChat.addEventListener("click", newChat);
page.keyForm.addEventListener("submit", saveKey);
loadModel();
