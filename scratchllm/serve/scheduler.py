"""The server's schedulers: one thread runs the engine, requests queue for it.

The engine is not thread-safe and one forward pass already uses every core, so one worker thread
runs the model and requests wait in a FIFO queue instead of failing. Two ways to batch them:

- `ContinuousScheduler` (the default, `scratchllm serve --scheduler continuous`): continuous batching
  through `generation.batcher.Batcher`. Requests join the running batch at token boundaries as rows
  free up, each with its own settings, stop strings and length; long prompts are read in chunks
  between the running rows' tokens. Greedy outputs equal each request served alone, and so do
  seeded samples (each row has its own generator).
- `Scheduler` (`--scheduler static`): one engine call at a time. Waiting non-streaming jobs with
  equal sampling settings (and no seed, unless greedy) run together as one batch; streaming and seeded
  sampling jobs run alone (a seed reproduces a completion only within the same batch).

    scheduler = make_scheduler(chat_model, "continuous", max_batch_size=8)
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
from ..generation.batcher import Batcher, Request
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


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error")


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
                    self._fail_queued()
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

    def _fail_queued(self) -> None:
        """Answer every queued job that the server is shutting down (called holding `_cv`)."""
        for job in self._jobs:
            job.fail(_shutting_down())
        self._jobs.clear()

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


class ContinuousScheduler(Scheduler):
    """Runs every generation of one `ChatModel` on a single worker thread by continuous batching
    (generation/batcher.py): up to `max_batch_size` prompts decode together, each joining the batch
    when a slot frees and leaving it when it ends; each step reads `prefill_chunk` prompt tokens at most.

    The jobs the batcher does not take run alone between its steps, as `Scheduler` runs them: a prompt
    whose reply would outgrow the context window (the engine crops it), `use_cache=False`, and seeded
    sampling with several prompts (which share one generator). An engine with a draft model
    (speculative decoding) or under torch.compile gets `Scheduler`'s loop instead. `batches_run` counts
    the jobs run to their end.
    """

    def __init__(self, model: ChatModel, max_batch_size: int = 8, prefill_chunk: int = 256):
        super().__init__(model, max_batch_size)
        if prefill_chunk < 1:
            raise ScratchLLMError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self._batcher: Batcher | None = None

    @property
    def waiting(self) -> int:
        """Jobs not started, and prompts waiting for a slot of the batch."""
        batcher = self._batcher
        return len(self._jobs) + (batcher.waiting if batcher is not None else 0)

    def _work(self) -> None:
        if not Batcher.supports(self.model.engine):
            return super()._work()
        batcher = self._batcher = Batcher(self.model.engine, self.max_batch_size, self.prefill_chunk)
        running: dict[Job, list[Request]] = {}
        while (jobs := self._take_new(wait=not running)) is not None:
            for job in jobs:
                self._start(job, batcher, running)
            for job in [job for job in running if job.cancelled.is_set()]:  # the client went away
                for request in running.pop(job):
                    batcher.cancel(request)
            if not running:
                continue
            try:
                batcher.step()
            except Exception as e:  # the jobs in the batch get the error; the worker keeps serving
                for job in running:
                    job.fail(e)
                running.clear()
                batcher.clear()
                continue
            self._deliver(running)
        for job in running:
            job.fail(_shutting_down())

    def _take_new(self, wait: bool) -> list[Job] | None:
        """The jobs queued since the last call (when `wait`, once there is one); None once closed."""
        with self._cv:
            while wait and not self._jobs and not self._closed:
                self._cv.wait()
            if self._closed:
                self._fail_queued()
                return None
            jobs = [job for job in self._jobs if not job.cancelled.is_set()]
            self._jobs.clear()
            return jobs

    def _start(self, job: Job, batcher: Batcher, running: dict[Job, list[Request]]) -> None:
        """Hand a job's prompts to the batcher (scored first if it asks), or run it alone."""
        cfg, engine = job.cfg, self.model.engine
        shared_seed = len(job.prompts) > 1 and cfg.temperature > 0 and cfg.seed is not None
        try:
            if shared_seed or not all(batcher.accepts(len(p), cfg) for p in job.prompts):
                if job.stream:
                    self._run_stream(job)
                else:
                    self._run_batch([job])
                return
            if job.score is not None and job.stream:
                job.post("scores", engine.prompt_logprobs(job.prompts[0], job.score))
            elif job.score is not None:
                job.scores = engine.score_prompts(job.prompts, job.score)
            requests: list[Request] = []
            try:
                for prompt in job.prompts:
                    requests.append(batcher.add(prompt, cfg, incremental=job.stream))
            except Exception:
                for request in requests:
                    batcher.cancel(request)
                raise
            running[job] = requests
        except Exception as e:  # the job's handler answers it; the worker keeps serving
            job.fail(e)

    def _deliver(self, running: dict[Job, list[Request]]) -> None:
        """Post the pieces the last step produced; answer the jobs whose prompts have all finished."""
        for job, requests in list(running.items()):
            if job.stream:
                for piece in requests[0].take_pieces():
                    job.post("piece", piece)
            if any(r.completion is None for r in requests):
                continue
            del running[job]
            self.batches_run += 1  # counted before the answer, which a caller may be waiting on
            if job.stream:
                job.post("done", (requests[0].completion, requests[0].rest_logprobs))
            else:
                job.resolve([r.completion for r in requests])  # type: ignore[misc]


SCHEDULERS = ("continuous", "static")


def make_scheduler(
    model: ChatModel, kind: str = "continuous", max_batch_size: int = 8, prefill_chunk: int = 256
) -> Scheduler:
    """The scheduler of `kind` (`SCHEDULERS`): continuous batching, or static batches of waiting jobs."""
    if kind == "continuous":
        return ContinuousScheduler(model, max_batch_size, prefill_chunk)
    if kind == "static":
        return Scheduler(model, max_batch_size)
    raise ScratchLLMError(f"unknown scheduler {kind!r}; use {' or '.join(SCHEDULERS)}")


__all__ = ["SCHEDULERS", "ContinuousScheduler", "Job", "Scheduler", "make_scheduler"]
