"""Stage 3's last step: talk to a model, or serve it over OpenAI's API, Ollama's API and a web page.

    chat.py           ChatModel (an engine and its prompt template), ChatSession, the `scratchllm chat` REPL
    schemas.py        OpenAI's request bodies and error shape
    openai_format.py  answers, streamed chunks, logprobs and usage in OpenAI's shapes
    scheduler.py      the one engine thread that requests queue for
    access.py         the API-key and model-name checks every router uses
    app.py            create_app: the FastAPI app and its OpenAI routes
    tokenize.py       /tokenize, /detokenize, /tokenizer_info as vLLM has them (for lm-evaluation-harness)
    ollama*.py        Ollama's API: routes, request bodies and options, answers and streams
    page.py, static/  the web chat page at /
    server.py         `scratchllm serve`: bind, load, run uvicorn

Nothing is imported here, so that `scratchllm chat` never loads FastAPI.
"""
