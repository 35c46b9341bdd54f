"""The engine path (onnxruntime-genai >= 0.18, ``og.Engine``): continuous batching on one thread.

An engine must be driven from the thread that made it: ``EngineWorker`` starts that thread and
is how the rest of the server talks to it (``submit``, ``wake``, ``stop``). Requests reach the
thread through a queue; the outputs of each ``engine.run`` step (which releases the GIL while
it computes) go back to each request's event loop in one hand-off. ``_Driver`` is the thread's
own state and its steps.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from builder.serve.generator import ModelRunner
from builder.serve.metrics import Metrics
from builder.serve.sampling import Finished, Output, Piece, Sampling

log = logging.getLogger("olive-builder.server")  # one logger for the whole server

GATHER_GAP = 0.003  # seconds the idle engine waits for another request of a burst
GATHER_MAX = 0.015  # ... and at most this long after the first
PREFILL_TOKENS_PER_STEP = 6  # measured on 2 cores: ~1.3 ms a prefilled token, ~8.5 ms a decode step


class Loop(Protocol):
    """Where a request's outputs are delivered from the engine thread: its asyncio event loop."""

    def call_soon_threadsafe(self, callback: Callable[[], None], /) -> object: ...


class Handle:
    """One request as the engine thread sees it: its inputs, its state, and where its outputs go."""

    def __init__(self, ids: list[int], sampling: Sampling, max_tokens: int, cancel: threading.Event,
                 loop: Loop, deliver: Callable[[Output], None]):
        self.ids, self.sampling, self.max_tokens, self.cancel = ids, sampling, max_tokens, cancel
        self.loop, self.deliver = loop, deliver
        self.request: Any = None
        self.turn = 0
        self.stream: Any = None
        self.generated: list[int] = []  # over all of its turns
        self.turn_tokens = 0  # tokens of the current turn
        self.cached = -1  # prompt tokens the engine reused, from the first turn
        self.state = "running"  # running | pausing (cancelled to re-batch) | paused (waiting to restart)
        self.cancel_sent = False

    @property
    def produced(self) -> int:
        return len(self.generated)

    @property
    def rebatchable(self) -> bool:
        # A new turn restarts guidance from the grammar's start, and a repetition penalty would see the
        # generated tokens as prompt: such requests run to their end.
        s = self.sampling
        return s.guidance is None and s.repetition_penalty is None and self.turn_tokens > 0


class _Immediate:
    """Stands in for an event loop where deliveries may run on the engine thread itself (warm-up)."""

    def call_soon_threadsafe(self, callback: Callable[[], None], /) -> None:
        callback()


_WAKE = object()
_STOP = object()


class EngineWorker:
    """The one thread that creates, owns and drives ``og.Engine``.

    onnxruntime-genai 0.18's CPU engine batches statically: a request that arrives while a batch
    runs waits until the whole batch has finished. Requests that arrive together are gathered
    for a few milliseconds into one batch. A request that arrives later gets in at the next step
    when waiting would cost more than this: the running turns are cancelled at a step boundary
    and begun again as new engine requests (prompt and generated tokens as the input, one
    prefill) together with the newcomers. Greedy output is the same token for token as without
    the pause. (A new turn of the same request with only the last token as input would repeat
    that token, since a cancelled turn keeps it; and a static engine rewinds a request only
    when it is the only one resident.)
    """

    def __init__(self, runner: ModelRunner, metrics: Metrics):
        self.runner, self.metrics = runner, metrics
        self.inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="engine", daemon=True)

    def start(self) -> None:
        self.thread.start()
        self.ready.wait()
        if self.error is not None:
            raise self.error

    def submit(self, handle: Handle) -> None:
        self.inbox.put(handle)

    def wake(self) -> None:
        """Make the thread look at cancellations now (it may be blocked waiting for work)."""
        self.inbox.put(_WAKE)

    def stop(self) -> None:
        self.inbox.put(_STOP)

    def warm_up(self, ids: list[int]) -> None:
        """One real token through the engine, so that "loaded" means "can generate"."""
        done = threading.Event()
        result: list[Finished | BaseException] = []

        def deliver(item: Output) -> None:
            if isinstance(item, (Finished, BaseException)):
                result.append(item)
                done.set()

        # No event loop yet in this thread: deliveries run on the engine thread itself.
        self.submit(Handle(ids, Sampling(temperature=0), 1, threading.Event(), _Immediate(), deliver))
        if not done.wait(60):
            raise RuntimeError("the engine did not generate a token within 60 s")
        if isinstance(result[0], BaseException):
            raise result[0]

    def _main(self) -> None:
        try:
            driver = _Driver(self.runner, self.metrics)
        except BaseException as e:  # noqa: BLE001 - reported to the loading thread
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        driver.run(self.inbox)


class _Driver:
    """The engine and the requests it holds, on the engine thread: no other thread touches this."""

    def __init__(self, runner: ModelRunner, metrics: Metrics):
        og = runner.og
        self.runner, self.metrics, self.reasons = runner, metrics, og.FinishReason
        self.engine = og.Engine(runner.model)
        self.buffer = self.engine.create_event_buffer(max(16, 4 * runner.batch_size))
        self.token_flag = og.EngineEventFlags.TOKEN.value
        self.finished_flag = og.EngineEventFlags.TURN_FINISHED.value
        self.failed_flag = og.EngineEventFlags.FAILED.value
        self.batch = runner.batch_size
        self.active: dict[int, Handle] = {}  # by id(request): every request with a turn running, pausing or paused
        # The engine's static batch size sizes its persistent buffers, but a step may still take
        # more requests (eagerly): hold the rest here, so that batch_size is the real bound.
        self.pending: collections.deque[Handle] = collections.deque()
        self.gathering_since: float | None = None

    def run(self, inbox: queue.SimpleQueue[object]) -> None:
        """Take what arrived, act on cancellations, schedule, step; until told to stop."""
        while True:
            items = self._receive(inbox)
            out: list[tuple[Handle, Output]] = []
            if not self._take(items, out):
                self._hand_off(out)
                return
            self._cancel(out)
            if self._gathering(arrived=bool(items)):
                self._hand_off(out)
                continue
            self._schedule(out)
            if any(h.state != "paused" for h in self.active.values()):
                self._step(out)
            if not self.active:
                self.metrics.batch_occupancy.set(0)
            self._hand_off(out)

    def _receive(self, inbox: queue.SimpleQueue[object]) -> list[object]:
        """Block only when nothing is generating (or, while gathering a batch, for a moment); otherwise
        take what arrived and step."""
        items: list[object] = []
        try:
            if self.gathering_since is not None:
                items.append(inbox.get(timeout=GATHER_GAP))
            else:
                items.append(inbox.get(block=not self.active and not self.pending))
            while True:
                items.append(inbox.get_nowait())
        except queue.Empty:
            pass
        return items

    def _take(self, items: list[object], out: list[tuple[Handle, Output]]) -> bool:
        """New requests wait in ``pending``; on stop, every request fails and this returns False."""
        for item in items:
            if item is _STOP:
                for handle in [*self.active.values(), *self.pending]:
                    out.append((handle, RuntimeError("the server is shutting down")))
                return False
            if isinstance(item, Handle):
                self.pending.append(item)
        return True

    def _cancel(self, out: list[tuple[Handle, Output]]) -> None:
        """Requests whose clients left: a waiting or paused one ends now, a running turn is cancelled."""
        for handle in [h for h in self.pending if h.cancel.is_set()]:  # clients that left while waiting
            self.pending.remove(handle)
            self.metrics.cancelled.inc()
            out.append((handle, Finished("cancelled", 0)))
        for handle in list(self.active.values()):
            if handle.cancel.is_set() and not handle.cancel_sent:
                handle.cancel_sent = True
                if handle.state == "paused":
                    self.metrics.cancelled.inc()
                    out.append((handle, Finished("cancelled", handle.produced, max(0, handle.cached))))
                    self._close(handle)
                elif handle.state == "running":
                    handle.request.cancel_turn(handle.turn)

    def _gathering(self, *, arrived: bool) -> bool:
        """From idle, wait while requests keep arriving (they come a few ms apart through HTTP)."""
        if not self.active and self.pending and len(self.pending) < self.batch:
            now = time.monotonic()
            if self.gathering_since is None:
                self.gathering_since = now
            if arrived and now - self.gathering_since < GATHER_MAX:
                return True
        self.gathering_since = None
        return False

    def _schedule(self, out: list[tuple[Handle, Output]]) -> None:
        """Pause the running turns for waiting requests when that pays; at a batch boundary, begin the next."""
        states = [h.state for h in self.active.values()]
        if self.pending and len(self.active) < self.batch and "running" in states and "pausing" not in states \
                and self._worth_pausing():
            for handle in self.active.values():
                if handle.state == "running":
                    handle.state = "pausing"
                    handle.request.cancel_turn(handle.turn)
            self.metrics.rebatches.inc()
        elif "running" not in states and "pausing" not in states:
            # A batch boundary: continue the paused requests and begin waiting ones, together.
            for handle in [h for h in self.active.values() if h.state == "paused"]:
                self._continue(handle, out)
            while self.pending and len(self.active) < self.batch:
                self._begin(self.pending.popleft(), out)

    def _worth_pausing(self) -> bool:
        """Pause the batch for a newcomer when the steps it would wait cost more than the re-prefill.

        On CPU a decode step costs about as much as prefilling PREFILL_TOKENS_PER_STEP tokens.
        """
        running = [h for h in self.active.values() if h.state == "running"]
        if not all(h.rebatchable for h in running):
            return False
        wait_steps = max(h.max_tokens - h.produced for h in running)
        refeed = sum(len(h.ids) + h.produced for h in running)
        return wait_steps * PREFILL_TOKENS_PER_STEP > refeed

    def _step(self, out: list[tuple[Handle, Output]]) -> None:
        """One ``engine.run``: a token for each running request; its end, or its failure."""
        try:
            events = self.engine.run(self.buffer)  # releases the GIL while the model computes
        except Exception as e:  # noqa: BLE001 - every request in flight fails, the server lives on
            log.exception("the engine failed a step")
            for handle in self.active.values():
                out.append((handle, e))
                handle.request.close()
            self.active.clear()
            events = []
        stepped: set[int] = set()
        for event in events:
            found = self.active.get(id(event.request))
            if found is not None and self._on_event(event, found, out):
                stepped.add(id(found))
        if stepped:
            self.metrics.batch_occupancy.set(len(stepped))
            self.metrics.engine_step_batch.observe(len(stepped))

    def _on_event(self, event: Any, handle: Handle, out: list[tuple[Handle, Output]]) -> bool:
        """One request's event of a step; True when it brought a token."""
        flags = event.flags.value
        got_token = bool(flags & self.token_flag)
        if got_token:
            token = int(event.token)
            handle.generated.append(token)
            handle.turn_tokens += 1
            out.append((handle, Piece(handle.stream.decode(token), token)))
        if flags & self.failed_flag:
            out.append((handle, RuntimeError(f"the engine failed the request: {event.error_code.name}")))
            self._close(handle)
        elif flags & self.finished_flag:
            usage = event.usage
            if handle.cached < 0 and usage is not None:
                handle.cached = int(usage.cached_prompt_tokens)
            if handle.state == "pausing" and event.finish_reason == self.reasons.CANCELLED \
                    and not handle.cancel.is_set():
                handle.state = "paused"
            else:
                out.append((handle, self._finished(event, handle)))
                self._close(handle)
        return got_token

    def _options(self, handle: Handle) -> Any:
        og, s = self.runner.og, handle.sampling
        options = og.TurnOptions(handle.request)
        options.set_max_generated_tokens(handle.max_tokens - handle.produced)
        minimum = (handle.max_tokens if s.ignore_eos else s.min_tokens) - handle.produced
        if minimum > 0:
            options.set_min_generated_tokens(minimum)  # EOS is masked until then
        if s.temperature is not None:
            if s.temperature == 0:
                options.set_do_sample(False)
            else:
                options.set_do_sample(True)
                options.set_temperature(s.temperature)
        if s.top_p is not None:
            options.set_top_p(s.top_p)
        if s.top_k is not None:
            options.set_top_k(s.top_k)
        if s.repetition_penalty is not None:
            options.set_repetition_penalty(s.repetition_penalty)
        if s.guidance is not None:
            options.set_guidance(*s.guidance)
        return options

    def _begin(self, handle: Handle, out: list[tuple[Handle, Output]]) -> None:
        import numpy as np

        try:
            handle.request = self.engine.create_request()
            handle.turn = handle.request.begin_turn(np.asarray(handle.ids, dtype=np.int32), self._options(handle))
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            out.append((handle, e))
            if handle.request is not None:
                handle.request.close()
            return
        handle.stream = self.runner.tokenizer.create_stream()
        handle.state = "running"
        self.active[id(handle.request)] = handle

    def _continue(self, handle: Handle, out: list[tuple[Handle, Output]]) -> None:
        """A paused request goes on as a new engine request: its prompt and what it generated as the input.

        (A static engine rewinds a request only when it is the only one resident.)
        """
        import numpy as np

        self._close(handle)
        try:
            handle.request = self.engine.create_request()
            handle.turn = handle.request.begin_turn(np.asarray([*handle.ids, *handle.generated], dtype=np.int32),
                                                    self._options(handle))
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            out.append((handle, e))
            handle.request.close()
            return
        self.active[id(handle.request)] = handle
        handle.turn_tokens = 0
        handle.state = "running"

    def _finished(self, event: Any, handle: Handle) -> Finished:
        reasons = self.reasons
        reason = event.finish_reason
        cached = max(0, handle.cached)
        if reason == reasons.CANCELLED:
            self.metrics.cancelled.inc()
            return Finished("cancelled", handle.produced, cached)
        if reason in (reasons.MAX_GENERATED_TOKENS, reasons.MAX_SESSION_TOKENS):
            return Finished("length", handle.produced, cached)
        return Finished("stop", handle.produced, cached)  # EOS (not emitted as a token) or a stop string

    def _close(self, handle: Handle) -> None:
        self.active.pop(id(handle.request), None)
        handle.request.close()

    @staticmethod
    def _hand_off(out: list[tuple[Handle, Output]]) -> None:
        """One wake-up of the event loop per engine step, not one per token."""
        by_loop: dict[int, list[tuple[Handle, Output]]] = {}
        for handle, item in out:
            by_loop.setdefault(id(handle.loop), []).append((handle, item))
        for items in by_loop.values():

            def deliver(items: list[tuple[Handle, Output]] = items) -> None:
                for handle, item in items:
                    handle.deliver(item)

            try:
                items[0][0].loop.call_soon_threadsafe(deliver)
            except RuntimeError:  # the loop closed (shutdown): nobody is listening any more
                pass
