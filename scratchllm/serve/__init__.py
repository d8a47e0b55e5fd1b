"""Stage 3's last step: talk to a model, or serve it over OpenAI's API.

    chat.py           ChatModel (an engine and its prompt template), ChatSession, the `scratchllm chat` REPL
    schemas.py        OpenAI's request bodies and error shape
    openai_format.py  answers, streamed chunks, logprobs and usage in OpenAI's shapes
    scheduler.py      the one engine thread that requests queue for, batching those that can share a batch
    app.py            create_app: the FastAPI app and its routes
    server.py         `scratchllm serve`: bind, load, run uvicorn

Nothing is imported here, so that `scratchllm chat` never loads FastAPI.
"""
