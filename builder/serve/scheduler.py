"""Admission and dispatch: the one interface between the HTTP layer and generation.

``Scheduler.generate(job)`` admits a job or answers 429 and returns its ``Generation``: an
async iterator of text (stop sequences applied), ``abort()`` when the client goes, ``release()``
when its response is done. Behind it, and touched by nothing else: the admission count, the
generation slots and the waiting requests, the engine thread (``og.Engine``) and the thread
pool of the generator path (``og.Generator``), and the choice between the two.

At most ``max_concurrency`` jobs generate at once; at most ``queue_size`` more wait; beyond
that a job gets 429 with Retry-After (the bound is counted when the job is admitted, so it
holds exactly). A client that disconnects cancels its generation at the next token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from builder.serve.engine import EngineWorker, Handle
from builder.serve.errors import ApiError
from builder.serve.generator import ModelRunner
from builder.serve.metrics import Load, Metrics
from builder.serve.sampling import Finished, Output, Piece, Sampling
from builder.serve.workers import Workers

AHEAD = 64  # text pieces a generator-path generation may run ahead of its HTTP writer


@dataclass(frozen=True)
class Job:
    """What to generate: ``max_tokens`` after the prompt ``ids``, with ``adapter`` active (None: the base)."""

    ids: list[int]
    sampling: Sampling
    max_tokens: int
    adapter: str | None
    started: float  # time.monotonic() when the request arrived: time to first token counts from it


class Scheduler:
    """The generation slots, the waiting requests and both generation paths of one loaded model."""

    def __init__(self, runner: ModelRunner, metrics: Metrics, *, max_concurrency: int, queue_size: int):
        self.runner, self.metrics = runner, metrics
        self.max_concurrency, self.queue_size = max_concurrency, queue_size
        self._engine: EngineWorker | None = None
        # Its threads end when idle: a burst of generator-path requests leaves none behind.
        self._pool = Workers(max_concurrency, "generate")
        self._slots = asyncio.Semaphore(max_concurrency)
        self._admitted = 0  # generating + waiting, counted at admission: the queue bound holds exactly
        self._waiting = 0
        # What routers read (``load``), kept on the event loop: the jobs holding a slot (each
        # with the tokens its KV cache holds so far) and the adapters of the jobs waiting for one.
        self._generating: dict[int, Job] = {}
        self._tokens: dict[int, int] = {}
        self._waiting_adapters: Counter[str] = Counter()

    def start(self) -> None:
        """Start the engine thread (when the model runs on the engine) and put one real token through
        every path, so that "loaded" means "can generate"."""
        if self.runner.use_engine:
            engine = EngineWorker(self.runner, self.metrics)
            engine.start()
            self._engine = engine
        ids = self.runner.encode(self.runner.chat_prompt([{"role": "user", "content": "Hi"}]))
        self.runner.warm_up(ids)
        if self._engine is not None:
            self._engine.warm_up(ids)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def busy(self) -> bool:
        """Whether any request is generating or waiting (on the event loop)."""
        return self._admitted > 0

    def load(self) -> Load:
        """The load routers and autoscalers read (``/metrics``); on the event loop."""
        return Load(running=len(self._generating), waiting=self._waiting, kv_tokens=sum(self._tokens.values()),
                    waiting_adapters=tuple(sorted(a for a, n in self._waiting_adapters.items() if n > 0)))

    def generate(self, job: Job) -> Generation:
        """Admit ``job`` (no await between the check and the count) or answer 429."""
        if self._admitted >= self.max_concurrency + self.queue_size:
            generating = min(self._admitted, self.max_concurrency)
            raise ApiError(429, f"The server is at capacity ({generating} generating, {self._admitted - generating} "
                                "waiting); retry shortly.", type_="rate_limit_error", code="server_busy",
                           headers={"Retry-After": "1"})
        self._admitted += 1
        # og.Engine (0.18) cannot activate an adapter for one request: adapter requests take the generator path.
        on_engine = self._engine is not None and job.adapter is None and self.runner.engine_can_serve(job.sampling)
        return Generation(self, job, on_engine=on_engine)

    # -- for Generation only

    def _release(self) -> None:
        self._admitted -= 1

    async def _enter(self, job: Job) -> None:
        """Wait for a generation slot."""
        self._waiting += 1
        self.metrics.waiting.set(self._waiting)
        if job.adapter is not None:
            self._waiting_adapters[job.adapter] += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
            self.metrics.waiting.set(self._waiting)
            if job.adapter is not None:
                self._waiting_adapters[job.adapter] -= 1
        self.metrics.in_flight.inc()
        self.metrics.prompt_tokens.inc(len(job.ids))
        self._generating[id(job)] = job
        self._tokens[id(job)] = len(job.ids)

    def _produced(self, job: Job) -> None:
        """One more token of ``job`` reached the event loop (its KV cache holds one more)."""
        if id(job) in self._tokens:
            self._tokens[id(job)] += 1

    def _free_slot(self, job: Job) -> None:
        """``job`` generates no more (finished, failed or stopped): its slot is the next job's."""
        self._generating.pop(id(job), None)
        self._tokens.pop(id(job), None)
        self.metrics.in_flight.dec()
        self._slots.release()

    def _count(self, finished: Finished | None) -> None:
        if finished is not None:
            self.metrics.completion_tokens.inc(finished.completion_tokens)
            self.metrics.cached_tokens.inc(finished.cached_tokens)

    def _wake_engine(self) -> None:
        if self._engine is not None:
            self._engine.wake()

    def _dispatch(self, job: Job, on_engine: bool, cancel: threading.Event, loop: asyncio.AbstractEventLoop,
                  queue_: asyncio.Queue[Output], ended: Callable[[], None]) -> threading.Semaphore | None:
        """Start ``job`` on its path, its outputs going to ``queue_`` (``ended`` called with its last);
        the generator path's credits, if any."""
        self.metrics.paths.labels("engine" if on_engine else "generator").inc()
        if job.adapter is not None:
            self.metrics.adapter_generations.labels(job.adapter).inc()

        def deliver(item: Output) -> None:  # on the event loop
            if isinstance(item, Piece):
                self._produced(job)  # counted as it arrives: a slow reader's unread tokens are held too
            else:
                # The generation is over: its slot is free now, even while its reader is behind
                # (a client that stopped reading no longer holds a slot once the engine is done).
                ended()
            queue_.put_nowait(item)

        if on_engine:
            assert self._engine is not None
            self._engine.submit(Handle(job.ids, job.sampling, job.max_tokens, cancel, loop, deliver))
            # The engine steps every request together and cannot pause one: a slow reader's
            # pieces wait here, bounded by its max_tokens.
            return None

        # Backpressure: the generator may run at most AHEAD pieces ahead of the HTTP writer, so a
        # request's memory is bounded and a client that left is noticed while generation still runs.
        credits = threading.Semaphore(AHEAD)

        def emit(piece: Piece) -> None:
            while not credits.acquire(timeout=0.1):
                if cancel.is_set():
                    return
            try:
                loop.call_soon_threadsafe(deliver, piece)
            except RuntimeError:  # the loop closed while we generated (shutdown)
                cancel.set()

        def work() -> None:
            try:
                result: Finished | BaseException = self.runner.generate(
                    job.ids, job.sampling, job.max_tokens, cancel, emit, adapter=job.adapter)
            except BaseException as e:  # noqa: BLE001 - handed to the event loop
                result = e
            if isinstance(result, Finished) and result.reason == "cancelled":
                self.metrics.cancelled.inc()
            try:
                loop.call_soon_threadsafe(deliver, result)
            except RuntimeError:  # the loop closed while we generated (shutdown)
                pass

        loop.run_in_executor(self._pool, work)  # it reports through the queue
        return credits


class Generation:
    """One admitted job on either path, its text handed to the event loop."""

    def __init__(self, scheduler: Scheduler, job: Job, *, on_engine: bool):
        self._scheduler, self.job, self._on_engine = scheduler, job, on_engine
        self._cancel = threading.Event()
        self._released = False
        self._holds_slot = False
        self.finished: Finished | None = None

    def release(self) -> None:
        """Give the admission back (once, however often called): the response is done."""
        if not self._released:
            self._released = True
            self._scheduler._release()

    def _ended(self) -> None:
        """The generation is over (its last output reached the event loop, or its reader stopped):
        its slot and its admission go to the next job, whether or not its text is all written."""
        if self._holds_slot:
            self._holds_slot = False
            self._scheduler._free_slot(self.job)
        self.release()

    def abort(self) -> None:
        """Stop generating (the client went away, or a stop sequence was found)."""
        if not self._cancel.is_set():
            self._cancel.set()
            if self._on_engine:
                self._scheduler._wake_engine()

    async def texts(self) -> AsyncIterator[tuple[str, list[Piece]]]:
        """Text with stop sequences applied, with the pieces it came from; sets ``self.finished`` at the end."""
        scheduler, job, loop = self._scheduler, self.job, asyncio.get_running_loop()
        metrics = scheduler.metrics
        queue_: asyncio.Queue[Output] = asyncio.Queue()
        await scheduler._enter(job)
        self._holds_slot = True
        first = True
        stops = job.sampling.stop
        held = ""
        held_pieces: list[Piece] = []
        consumed = 0
        try:
            credits = scheduler._dispatch(job, self._on_engine, self._cancel, loop, queue_, self._ended)
            while True:
                item = await queue_.get()
                if isinstance(item, BaseException):
                    raise ApiError(500, f"Generation failed: {item}", type_="server_error")
                if isinstance(item, Finished):
                    self.finished = item
                    if held or held_pieces:
                        yield held, held_pieces
                    break
                if credits is not None:
                    credits.release()
                consumed += 1  # one piece per generated token
                if first:
                    metrics.ttft.observe(time.monotonic() - job.started)
                    first = False
                held += item.text
                held_pieces.append(item)
                # As vLLM: no stop sequence ends the text before min_tokens tokens (a token after
                # them may complete one begun before).
                cut = _find_stop(held, stops) if consumed > job.sampling.min_tokens else None
                if cut is not None:
                    self.abort()
                    if held[:cut]:
                        yield held[:cut], held_pieces
                    final = await _drain(queue_)  # the generation stops at its next token
                    # Usage counts the tokens up to the one that completed the stop sequence,
                    # not those generated after it.
                    cached = final.cached_tokens if isinstance(final, Finished) else 0
                    self.finished = Finished("stop", consumed, cached)
                    break
                keep = _stop_prefix_len(held, stops)
                if len(held) > keep:
                    yield held[: len(held) - keep], held_pieces
                    held, held_pieces = held[len(held) - keep :], []
        finally:
            self.abort()
            self._ended()
            scheduler._count(self.finished)

    async def collect(self, disconnected: Callable[[], Awaitable[bool]]) -> tuple[str, list[Piece], Finished]:
        """The whole answer of a non-streaming request, cancelled if ``disconnected()`` says the client went."""
        texts: list[str] = []
        pieces: list[Piece] = []

        async def consume() -> None:
            async for text, more in self.texts():
                texts.append(text)
                pieces.extend(more)

        task = asyncio.ensure_future(consume())
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if not done and await disconnected():
                    self.abort()
        except BaseException:
            task.cancel()
            raise
        task.result()
        assert self.finished is not None
        return "".join(texts), pieces, self.finished


async def _drain(queue_: asyncio.Queue[Output]) -> Output:
    """Wait for the generation's final item (it stops at the next token once cancelled)."""
    while True:
        item = await queue_.get()
        if isinstance(item, (Finished, BaseException)):
            return item


def _find_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop sequence."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
