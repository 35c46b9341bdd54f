"""The evaluation stage: the checked model against its source model, and its speed, before
packaging; a failed gate fails the build.

Where each part lives:

- ``builder.build.measure`` (with ``builder.build.source_figures``): the measuring, inside the
  builder image or here with the ``local`` extra (perplexity, top-1 agreement, KL divergence,
  greedy agreement, speed);
- ``gates``: the recipe's settings and the limits per precision, and the verdict;
- ``report``: the record (``EvaluationRecord``, olive-builder.json's ``evaluation``), its table
  and its manifest annotations;
- ``inputs``: the source model and a Hub evaluation text, found on the host;
- ``in_image``: the same evaluation in a builder image, through the engine;
- ``__main__``: ``python -m builder.build.evaluate MODEL_DIR [--against SOURCE_DIR] [--json]``.

This module is the stage itself (``evaluate``: measure, then apply the gates) and the public
surface that the worker, the pipeline and the CLI use. Stdlib only at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from builder.build.evaluate.gates import Settings, applicable_gates, check_gates, raise_for_gates
from builder.build.evaluate.in_image import evaluate_in_image
from builder.build.evaluate.inputs import HubText, resolve_source
from builder.build.evaluate.report import (
    EvaluationRecord,
    format_table,
    manifest_annotations,
    not_evaluated,
    table_from_annotations,
)
from builder.build.measure import AdapterUnderTest, measure

__all__ = [
    "AdapterUnderTest",
    "EvaluationRecord",
    "HubText",
    "Settings",
    "evaluate",
    "evaluate_in_image",
    "format_table",
    "manifest_annotations",
    "not_evaluated",
    "raise_for_gates",
    "resolve_source",
    "table_from_annotations",
]


def evaluate(
    model_dir: str | Path,
    source_dir: str | Path | None,
    *,
    precision: str | None,
    device: str = "cpu",
    settings: Settings | None = None,
    text_path: str | Path | None = None,
    trust_remote_code: bool = False,
    on_progress: Callable[[str], object] | None = None,
    adapter: AdapterUnderTest | None = None,
) -> EvaluationRecord:
    """Measure the built model in ``model_dir`` against ``source_dir`` and apply the gates.

    Returns the record whatever the verdict; ``raise_for_gates`` turns a failure into an
    EvaluationError. ``source_dir`` None measures the built model alone (no ratios, no gates
    on them). ``text_path`` overrides ``settings.text``. ``adapter``: measure the finetuned
    model instead of the base (see ``builder.build.measure.measure``); the record names it."""
    settings = settings or Settings()
    figures = measure(
        model_dir,
        source_dir,
        device=device,
        text_path=text_path if text_path is not None else settings.text,
        text_source=None if text_path is not None else settings.text_source,
        max_tokens=settings.max_tokens,
        speed=settings.speed,
        trust_remote_code=trust_remote_code,
        on_progress=on_progress,
        adapter=adapter,
    )
    gates = (applicable_gates(figures.accuracy, precision, settings.gates, figures.source_vocab)
             if figures.source_vocab is not None else {})
    return EvaluationRecord(
        evaluated=True,
        precision=precision,
        text=figures.text,
        accuracy=figures.accuracy,
        speed=figures.speed,
        gates=gates,
        failures=check_gates(figures.accuracy, gates),
        seconds=figures.seconds,
        timings=figures.timings,
        adapter=figures.adapter,
        source_cached=figures.source_cached,
    )
