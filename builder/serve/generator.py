"""The loaded model (``ModelRunner``): genai_config, tokenizer, LoRA adapters, and the blocking
``og.Generator`` loop, the path for what ``og.Engine`` cannot serve (a seeded sampled request on
the static CPU engine, ``logprobs``, an adapter) and for everything on an onnxruntime-genai
without ``Engine``.

onnxruntime_genai and numpy are imported when a model is loaded, not when this module is.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from builder import contract
from builder.contract import ADAPTER_NAME_MAX, ADAPTER_NAME_RULE, ADAPTERS_DIR, adapters_in
from builder.serve.errors import AdapterLoadError, ort_message
from builder.serve.sampling import Finished, Piece, Sampling, seed32

DEFAULT_BATCH_SIZE = 4  # the most the static engine steps at once (ENGINE_STEP_LIMIT)
# onnxruntime-genai's static batching (the CPU engine) steps at most 4 requests at once whatever
# engine.static_batching.max_batch_size says (StaticBatchScheduler::Schedule, `static_batch_size = 4`).
# Measured on 0.18 with max_batch_size 8 and 8 requests: every step carried 4 tokens. A server at
# batch 8 believed it had room and paused running requests to re-batch them with newcomers the
# engine could not run beside them: 124 tokens/s to 8 streams against 161 at batch 4 (first tokens
# 2.7 s against 2.1 s). A larger batch size is therefore held to this.
ENGINE_STEP_LIMIT = 4


def _engine_section(config: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """genai_config.json's ``engine`` section and its static batch size, checked: a folder from
    anywhere may say anything there, and a wrong shape is named, not met with an AttributeError."""
    engine = config.get("engine") or {}
    static = engine.get("static_batching") or {} if isinstance(engine, dict) else None
    if not isinstance(engine, dict) or not isinstance(static, dict):
        raise ValueError("genai_config.json: `engine` and `engine.static_batching` must be objects")
    size = static.get("max_batch_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 256):
        raise ValueError(f"genai_config.json: engine.static_batching.max_batch_size must be a whole number from "
                         f"1 to 256, not {json.dumps(size)[:40]}")
    return engine, size


def engine_available(og: Any) -> bool:
    return hasattr(og, "Engine") and hasattr(og, "TurnOptions")


def load_onnxruntime_genai() -> Any:
    """The onnxruntime_genai module, with its telemetry off: every server route imports it here.

    onnxruntime-genai 0.18 carries a telemetry client (a persisted device id, a heartbeat): a model
    server in someone's cluster must not call out. Measured with strace: only the environment
    switch, set before the library loads, stops its DNS lookup of the events host;
    disable_telemetry_events() alone does not. The runtime images set it too; a value the operator
    set stays (an empty one turns telemetry on)."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime_genai as og

    if hasattr(og, "disable_telemetry_events"):  # older releases have no such client
        og.disable_telemetry_events()
    return og


class ModelRunner:
    """One loaded model, its tokenizer, and the blocking generator-path loop."""

    def __init__(self, folder: str | Path, *, batch_size: int | None = None, use_engine: bool = True):
        og = load_onnxruntime_genai()
        self.og = og
        self.folder = Path(folder)
        config = json.loads((self.folder / "genai_config.json").read_text())
        if not isinstance(config, dict) or not all(isinstance(config.get(k) or {}, dict) for k in ("model", "search")):
            raise ValueError("genai_config.json: the file, its `model` and its `search` must be JSON objects")
        model = config.get("model", {})
        search = config.get("search", {})
        # The KV cache is sized by search.max_length: that, not the model's native context, is the limit.
        self.context_length = int(search.get("max_length") or model.get("context_length") or 2048)
        self.vocab_size = int(model.get("vocab_size") or 0)
        self.default_do_sample = bool(search.get("do_sample", False))
        eos = model.get("eos_token_id", [])
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.use_engine = use_engine and engine_available(og)
        engine, configured = _engine_section(config)
        self.batch_size = batch_size or configured or DEFAULT_BATCH_SIZE
        self.batch_size_asked = self.batch_size
        if self.use_engine and not engine.get("dynamic_batching") and self.batch_size > ENGINE_STEP_LIMIT:
            self.batch_size = ENGINE_STEP_LIMIT
        if self.use_engine:
            # The batch size is the engine's, read from genai_config.json: overlay it in memory so
            # the (possibly read-only) model folder stays as it is.
            og_config = contract.og_config(og, self.folder)  # the compute threads (usable CPUs)
            og_config.overlay(json.dumps({"engine": {"static_batching": {"max_batch_size": self.batch_size}}}))
            self.model = og.Model(og_config)
        else:
            self.model = og.Model(contract.og_config(og, self.folder))
        self.tokenizer = og.Tokenizer(self.model)
        self.version = getattr(og, "__version__", "")
        self.adapters: Any = None
        self.adapter_names: tuple[str, ...] = ()
        # onnxruntime-genai counts an adapter's users in a plain integer (Adapter::AcquireRef when
        # a generator activates it, ReleaseRef when the generator goes): activation and release
        # happen under this lock, so concurrent requests of one adapter cannot lose a count.
        self._adapter_lock = threading.Lock()
        self._load_adapters(adapters_in(self.folder))

    def _load_adapters(self, found: dict[str, Path]) -> None:
        """Load every adapter now: a bad one must stop the start, not fail the first request."""
        if not found:
            return
        og = self.og
        where = self.folder / ADAPTERS_DIR
        for name in found:
            if len(name) > ADAPTER_NAME_MAX or not re.fullmatch(ADAPTER_NAME_RULE, name):
                raise AdapterLoadError(
                    f"the adapter file {found[name].name} in {where} has an invalid name: an adapter name is "
                    f"lowercase letters and digits in words joined by '-', at most {ADAPTER_NAME_MAX} characters; "
                    "rename the file or remove it")
        if not hasattr(og, "Adapters"):
            raise AdapterLoadError(f"{where} holds adapters but onnxruntime-genai {self.version} has no adapter "
                                   "support (og.Adapters); use onnxruntime-genai >= 0.5")
        adapters = og.Adapters(self.model)
        for name, path in found.items():
            try:
                adapters.load(str(path), name)
            except Exception as e:  # noqa: BLE001 - reported as what it is: this adapter is bad
                raise AdapterLoadError(f"the adapter `{name}` ({path}) cannot be loaded: {ort_message(e)} Rebuild "
                                       f"it, or remove it from {where} to serve the model without it") from None
        self.adapters = adapters
        self.adapter_names = tuple(found)

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        if tools:
            return str(self.tokenizer.apply_chat_template(json.dumps(messages), tools=json.dumps(tools),
                                                          add_generation_prompt=True))
        return str(self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True))

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def token_text(self, token: int) -> str:
        return str(self.tokenizer.decode([token]))

    def sampled(self, sampling: Sampling) -> bool:
        if sampling.temperature is not None:
            return sampling.temperature > 0
        return self.default_do_sample

    def engine_can_serve(self, sampling: Sampling) -> bool:
        """The CPU engine (static batching) has no per-turn seed and no logits."""
        if not self.use_engine or sampling.logprobs:
            return False
        return not (sampling.seed is not None and self.sampled(sampling))

    def generate(self, ids: list[int], sampling: Sampling, max_tokens: int, cancel: threading.Event,
                 emit: Callable[[Piece], None], adapter: str | None = None) -> Finished:
        """Blocking: generate up to ``max_tokens`` after ``ids``, calling ``emit`` with each piece.

        With ``adapter``, that loaded adapter is active in this generation's own generator (one
        adapter per generator: concurrent requests of other adapters, or of the base, are unaffected).
        """
        if adapter is None:
            return self._generate(ids, sampling, max_tokens, cancel, emit, None)
        if adapter not in self.adapter_names:
            raise ValueError(f"no adapter named {adapter!r} is loaded")
        return self._generate(ids, sampling, max_tokens, cancel, emit, adapter)

    def warm_up(self, ids: list[int]) -> None:
        """One real token from the base model and from every adapter: "loaded" means "can generate"."""
        self.generate(ids, Sampling(temperature=0), 1, threading.Event(), lambda piece: None)
        for name in self.adapter_names:
            # An adapter that loads but does not fit the graph (another base, another rank) fails
            # only when it runs: run it now.
            try:
                self.generate(ids, Sampling(temperature=0), 1, threading.Event(), lambda piece: None, adapter=name)
            except Exception as e:  # noqa: BLE001 - reported as what it is: this adapter is bad
                raise AdapterLoadError(f"the adapter `{name}` loads but cannot generate with this model "
                                       f"({ort_message(e)}): was it trained on another base model? Rebuild it, or "
                                       f"remove it from {self.folder / ADAPTERS_DIR} to serve the model without it") \
                    from None

    def _generate(self, ids: list[int], sampling: Sampling, max_tokens: int, cancel: threading.Event,
                  emit: Callable[[Piece], None], adapter: str | None) -> Finished:
        og = self.og
        params = og.GeneratorParams(self.model)
        options: dict[str, Any] = {"max_length": len(ids) + max_tokens}
        if sampling.temperature is not None:
            if sampling.temperature == 0:
                options["do_sample"] = False
            else:
                options.update(do_sample=True, temperature=sampling.temperature)
        if sampling.top_p is not None:
            options["top_p"] = sampling.top_p
        if sampling.top_k is not None:
            options["top_k"] = sampling.top_k
        if sampling.seed is not None:
            options["random_seed"] = seed32(sampling.seed)
        if sampling.repetition_penalty is not None:
            options["repetition_penalty"] = sampling.repetition_penalty
        minimum = max_tokens if sampling.ignore_eos else sampling.min_tokens
        if minimum:
            options["min_length"] = len(ids) + minimum  # genai masks EOS until min_length
        params.set_search_options(**options)
        if sampling.guidance is not None:
            params.set_guidance(*sampling.guidance)
        generator = og.Generator(self.model, params)
        try:
            if adapter is not None:
                with self._adapter_lock:
                    generator.set_active_adapter(self.adapters, adapter)
            generator.append_tokens(ids)
            stream = self.tokenizer.create_stream()
            produced = 0
            want_logits = sampling.logprobs
            while produced < max_tokens and not generator.is_done():
                if cancel.is_set():
                    return Finished("cancelled", produced)
                # The logits that choose the next token: get_logits after generate_next_token would
                # already be those of the token after it.
                logits = generator.get_logits() if want_logits else None
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                if token in self.eos_ids and not sampling.ignore_eos:
                    return Finished("stop", produced)
                produced += 1
                piece = Piece(stream.decode(token), token)
                if logits is not None:
                    piece.logprob, piece.top = _logprobs(logits, token, sampling.top_logprobs)
                emit(piece)
            return Finished("length", produced)
        finally:
            if adapter is not None:
                with self._adapter_lock:  # the generator releases its adapter as it goes
                    del generator


def _logprobs(logits: Any, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability under the model's raw distribution, and the ``top`` best."""
    import numpy as np

    row = np.asarray(logits, dtype=np.float64).reshape(-1)
    shifted = row - row.max()
    logp = shifted - math.log(float(np.exp(shifted).sum()))
    best: list[tuple[int, float]] = []
    if top:
        order = np.argsort(-logp, kind="stable")[:top]
        best = [(int(i), float(logp[i])) for i in order]
    return float(logp[token]), best
