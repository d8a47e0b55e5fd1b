"""The server's scheduler: one thread runs the engine, requests queue for it.

The engine is not thread-safe and one forward pass already uses every core, so the model runs one
batch at a time and requests wait in a FIFO queue instead of failing. Waiting non-streaming jobs
with equal sampling settings (and no seed, unless greedy) run together as one batch, which the
engine's batched decoding makes several times faster than one by one; streaming and seeded sampling
jobs run alone (a seed reproduces a completion only within the same batch).

    scheduler = Scheduler(chat_model, max_batch_size=8)
    completions, scores = await scheduler.run(prompts, cfg)     # from the event loop
    async for kind, value in scheduler.stream(prompt, cfg): ...
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import ScratchLLMError
from ..generation import Completion, GenerationConfig, TokenLogprob
from .chat import ChatModel
from .schemas import APIError


@dataclass(eq=False)
class Job:
    """One request's generation: token-id prompts and settings, and where its results go."""

    prompts: list[list[int]]
    cfg: GenerationConfig
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    score: int | None = None  # echo with logprobs: score the prompts too, with this many alternatives
    scores: list[list[TokenLogprob | None]] | None = None  # set by the worker before the result
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: asyncio.Future | None = None  # non-streaming: the list of Completions
    # streaming: ("scores", the prompt's token logprobs), ("piece", (text, its tokens' logprobs)),
    # ("done", (Completion, the logprobs no piece carried)), ("error", exc)
    events: asyncio.Queue | None = None

    def __post_init__(self) -> None:
        if self.stream:
            self.events = asyncio.Queue()
        else:
            self.future = self.loop.create_future()

    def can_join(self, other: Job, rows: int, max_rows: int) -> bool:
        """Whether `other` may run in this job's batch, which has `rows` prompts so far."""
        return (
            not self.stream
            and not other.stream
            # equal settings but for the seed, which matters only when sampling (lm-eval's greedy
            # requests carry one)
            and self.cfg.replace(seed=None) == other.cfg.replace(seed=None)
            and (self.cfg.temperature == 0 or self.cfg.seed is other.cfg.seed is None)
            and self.score == other.score
            and rows + len(other.prompts) <= max_rows
        )

    def resolve(self, completions: list[Completion]) -> None:
        self.loop.call_soon_threadsafe(_set_result, self.future, completions)

    def fail(self, error: BaseException) -> None:
        if self.stream:
            self.post("error", error)
        else:
            self.loop.call_soon_threadsafe(_set_exception, self.future, error)

    def post(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))  # type: ignore[union-attr]


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():  # the client may have gone away
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class Scheduler:
    """Runs every generation of one `ChatModel` on a single worker thread, in arrival order.

    When the worker takes a non-streaming job it also takes the waiting jobs with equal settings
    (up to `max_batch_size` prompts in all) and decodes them as one batch.
    """

    def __init__(self, model: ChatModel, max_batch_size: int = 8):
        if max_batch_size < 1:
            raise ScratchLLMError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.max_batch_size = max_batch_size
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches_run = 0  # how many engine calls ran (for tests and logs)

    def start(self) -> None:
        with self._cv:
            if self._thread is None:
                self._closed = False
                self._thread = threading.Thread(target=self._work, name="scratchllm-engine", daemon=True)
                self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self.start()
        with self._cv:
            self._jobs.append(job)
            self._cv.notify()

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    async def run(
        self, prompts: list[list[int]], cfg: GenerationConfig, score: int | None = None
    ) -> tuple[list[Completion], list[list[TokenLogprob | None]] | None]:
        """The completions, and with `score` the prompts' token logprobs (see `Engine.prompt_logprobs`)."""
        job = Job(prompts, cfg, asyncio.get_running_loop(), score=score)
        self.submit(job)
        try:
            return await job.future, job.scores  # type: ignore[misc]
        except asyncio.CancelledError:
            job.cancelled.set()
            raise

    async def stream(
        self, prompt: list[int], cfg: GenerationConfig, score: int | None = None
    ) -> AsyncIterator[tuple[str, Any]]:
        """One prompt's events as the worker posts them (see `Job.events`), up to "done"."""
        job = Job([prompt], cfg, asyncio.get_running_loop(), stream=True, score=score)
        self.submit(job)
        try:
            while True:
                kind, value = await job.events.get()  # type: ignore[union-attr]
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "done":
                    return
        finally:  # done, failed, or the client disconnected
            job.cancelled.set()

    def _take(self) -> list[Job]:
        with self._cv:
            while True:
                while not self._jobs and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for job in self._jobs:
                        job.fail(APIError(503, "the server is shutting down", type="server_error"))
                    self._jobs.clear()
                    return []
                first = self._jobs.popleft()
                if not first.cancelled.is_set():
                    break
            batch, rows, rest = [first], len(first.prompts), deque()
            while self._jobs:
                job = self._jobs.popleft()
                if job.cancelled.is_set():
                    continue
                if first.can_join(job, rows, self.max_batch_size):
                    batch.append(job)
                    rows += len(job.prompts)
                else:
                    rest.append(job)
            self._jobs = rest
            return batch

    def _work(self) -> None:
        while batch := self._take():
            try:
                if batch[0].stream:
                    self._run_stream(batch[0])
                else:
                    self._run_batch(batch)
            except Exception as e:  # the job's handler answers it; the worker keeps serving
                for job in batch:
                    job.fail(e)

    def _score(self, scored: list[Job]) -> list[Job]:
        """Score the prompts of the jobs that asked (echo with logprobs); the jobs that failed."""
        engine = self.model.engine
        try:  # every prompt of the batch in as few forward passes as fit
            scores = engine.score_prompts([p for job in scored for p in job.prompts], scored[0].score)
            start = 0
            for job in scored:
                job.scores, start = scores[start : start + len(job.prompts)], start + len(job.prompts)
            return []
        except Exception:
            failed = []
            for job in scored:  # find whose request broke it: each alone
                try:
                    job.scores = engine.score_prompts(job.prompts, job.score)
                except Exception as e:
                    job.fail(e)
                    failed.append(job)
            return failed

    def _run_batch(self, batch: list[Job]) -> None:
        scored = [job for job in batch if job.score is not None]  # joined jobs share `score`
        if scored:
            failed = self._score(scored)
            batch = [job for job in batch if job not in failed]
        if not batch:
            return
        prompts = [p for job in batch for p in job.prompts]
        try:
            completions = self.model.engine.generate(prompts, batch[0].cfg)
            self.batches_run += 1
        except Exception:
            if len(batch) == 1:
                raise
            for job in batch:  # find whose request broke the batch: each alone
                try:
                    job.resolve(self.model.engine.generate(job.prompts, job.cfg))
                except Exception as e:
                    job.fail(e)
            return
        start = 0
        for job in batch:
            job.resolve(completions[start : start + len(job.prompts)])
            start += len(job.prompts)

    def _run_stream(self, job: Job) -> None:
        if job.score is not None:
            job.post("scores", self.model.engine.prompt_logprobs(job.prompts[0], job.score))
        stream = self.model.engine.stream(job.prompts[0], job.cfg)
        try:
            for piece in stream:
                if job.cancelled.is_set():  # the client went away
                    return
                job.post("piece", (piece, stream.piece_logprobs))
            job.post("done", (stream.completion, stream.rest_logprobs))
            self.batches_run += 1
        finally:
            stream.close()


__all__ = ["Job", "Scheduler"]
