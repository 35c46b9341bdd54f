"""What the app serves: one model folder, the ids clients call it by, and, once loaded, its
``ModelRunner`` and ``Scheduler``. Loading runs in a thread; until it has finished, the model
is "loading" (503), and a model that failed to load says why (500).

No HTTP here: ``builder.serve.app`` builds the routes over this state.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from builder.contract import INFO_FILE
from builder.serve.errors import ApiError
from builder.serve.generator import DEFAULT_BATCH_SIZE, ModelRunner
from builder.serve.metrics import Capacity, Metrics
from builder.serve.scheduler import Scheduler
from builder.serve.workers import Workers

log = logging.getLogger("olive-builder.server")  # one logger for the whole server

PREPARE_WORKERS = 2


class ServedModel:
    """The model folder being served and, once it has loaded, the runner and scheduler over it."""

    def __init__(self, folder: str | Path, *, model_id: str | None = None, max_concurrency: int | None = None,
                 queue_size: int = 16, batch_size: int | None = None, use_engine: bool = True):
        self.folder = Path(folder)
        self.model_id = model_id or _default_model_id(self.folder)
        self.requested_concurrency = max_concurrency
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.use_engine = use_engine
        self.metrics = Metrics(model_name=self.model_id)
        # Parsing, validating, templating and tokenizing requests (``serving``): off the event
        # loop, in at most PREPARE_WORKERS threads (more would only compete for the GIL); bodies
        # of LARGE_BODY bytes or more in one thread of their own, so that a flood of them takes
        # at most that thread (and never delays the small requests).
        self.preparing = Workers(PREPARE_WORKERS, "prepare")
        self.preparing_large = Workers(1, "prepare-large")
        self.created = int(time.time())
        self.runner: ModelRunner | None = None  # set once the model has loaded and generated its first token
        self.scheduler: Scheduler | None = None
        self.load_error: str | None = None
        self.load_finished = threading.Event()  # loaded or failed
        self._starting: Scheduler | None = None

    def load(self) -> None:
        """Load the model and warm every path up (blocking: run in a thread); failures go to ``load_error``."""
        started = time.monotonic()
        try:
            runner = ModelRunner(self.folder, batch_size=self.batch_size, use_engine=self.use_engine)
            concurrency = self.requested_concurrency or (runner.batch_size if runner.use_engine
                                                          else DEFAULT_BATCH_SIZE)
            scheduler = Scheduler(runner, self.metrics, max_concurrency=concurrency, queue_size=self.queue_size)
            self._starting = scheduler  # a shutdown during the warm-up still stops its engine
            scheduler.start()
            self.metrics.router.capacity = Capacity(concurrency * runner.context_length, runner.adapter_names)
            self.metrics.router.load = scheduler.load
            self.runner, self.scheduler = runner, scheduler
            path = f"engine, batch size {runner.batch_size}" if runner.use_engine else "generator only"
            if runner.batch_size != runner.batch_size_asked:
                log.warning("batch size %d asked; the engine's static batching steps at most %d requests at "
                            "once (onnxruntime-genai %s), so the batch size is %d and more requests wait for "
                            "a place in it", runner.batch_size_asked, runner.batch_size, runner.version,
                            runner.batch_size)
            log.info("model %s loaded from %s in %.2fs (onnxruntime-genai %s, %s, %d at once, %d waiting)",
                     self.model_id, self.folder, time.monotonic() - started, runner.version, path,
                     concurrency, self.queue_size)
            if runner.adapter_names:
                log.info("adapters (on the generator path): %s",
                         ", ".join(f"{self.model_id}:{name}" for name in runner.adapter_names))
        except Exception as e:  # noqa: BLE001 - reported through /health and the log
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("cannot load the model in %s: %s", self.folder, self.load_error)
        finally:
            self.load_finished.set()

    def close(self) -> None:
        if self._starting is not None:
            self._starting.close()
        self.preparing.shutdown(wait=False, cancel_futures=True)
        self.preparing_large.shutdown(wait=False, cancel_futures=True)

    def ready(self) -> tuple[ModelRunner, Scheduler]:
        """The loaded model and its scheduler; 503 while loading, 500 if loading failed."""
        if self.runner is None or self.scheduler is None:
            if self.load_error:
                raise ApiError(500, f"The model failed to load: {self.load_error}", type_="server_error")
            raise ApiError(503, "The model is still loading; retry shortly.", type_="server_error",
                           headers={"Retry-After": "1"})
        return self.runner, self.scheduler

    def served_ids(self) -> list[str]:
        """The base model's id, then ``<base>:<adapter>`` for each adapter (none until loaded)."""
        adapters = self.runner.adapter_names if self.runner is not None else ()
        return [self.model_id, *(f"{self.model_id}:{name}" for name in adapters)]

    def adapter_of(self, model: str) -> str | None:
        """None for the base model, the adapter's name for ``<base>:<adapter>``; 404 for anything else."""
        if model == self.model_id:
            return None
        prefix = self.model_id + ":"
        served = self.served_ids()
        if model.startswith(prefix) and model in served:
            return model[len(prefix):]
        listed = ", ".join(f"`{m}`" for m in served[:8]) + (f" and {len(served) - 8} more" if len(served) > 8 else "")
        what = "adapter" if model.startswith(prefix) else "model"
        raise ApiError(404, f"The {what} `{model}` does not exist; this server serves {listed} (GET /v1/models).",
                       param="model", code="model_not_found")

    def health(self) -> tuple[dict[str, Any], int]:
        """``GET /health``'s body and status: 200 only once the model is loaded."""
        if self.runner is not None:
            body: dict[str, Any] = {"status": "ok", "model": self.model_id}
            if self.runner.adapter_names:
                body["adapters"] = self.served_ids()[1:]
            return body, 200
        if self.load_error is not None:
            return {"status": "error", "error": self.load_error}, 500
        return {"status": "loading"}, 503


def _default_model_id(folder: Path) -> str:
    """The build's first tag from its record; the folder's name for a folder not made by a build."""
    info = folder / INFO_FILE
    try:
        data = json.loads(info.read_text())
        return str(data["tags"][0])
    except FileNotFoundError:
        return folder.resolve().name
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        log.warning("cannot read the model id from %s (%s: %s); serving as `%s` (set --model-id)",
                    info, type(e).__name__, e, folder.resolve().name)
        return folder.resolve().name
