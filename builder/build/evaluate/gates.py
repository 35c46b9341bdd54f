"""The evaluation's settings (the recipe's ``evaluate:`` section as the plan carries it) and its
gates: the limits per target precision, which of them apply to a set of figures, and the verdict.

Stdlib only: the worker applies the gates inside the builder image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from builder.build.evaluate.report import EvaluationRecord, format_table
from builder.build.measure import DEFAULT_MAX_TOKENS
from builder.errors import EvaluationError

UNINFORMED = 0.25  # a source perplexity above this share of the vocabulary: agreement gates are not applied

# Limits per target precision (`python benchmarks/bench_eval.py --calibrate`; figures in README
# "Evaluation"). On the tiny model trained on the evaluation text, correct conversions measured
# perplexity ratios 0.999-1.000 and top-1 agreement 1.0 (fp32), 0.97 (int8), 0.89 (int4). The
# perplexity limits are the project's starting points, above every correct figure; the top-1
# limits sit below the correct figure by a margin twice the tiny model's own int4/int8 loss
# (real models lose more than a 64-wide one), and above what damaged weights measured
# (fp32 +5 % noise: 0.95; int4 +20 %: 0.57). fp16/bf16 could not be built for a CPU here: their
# limits are interpolated, not measured.
DEFAULT_GATES: dict[str, dict[str, float]] = {
    "fp32": {"max_perplexity_ratio": 1.001, "min_top1_agreement": 0.98},
    "fp16": {"max_perplexity_ratio": 1.01, "min_top1_agreement": 0.95},
    "bf16": {"max_perplexity_ratio": 1.01, "min_top1_agreement": 0.95},
    "int8": {"max_perplexity_ratio": 1.05, "min_top1_agreement": 0.90},
    "int4": {"max_perplexity_ratio": 1.15, "min_top1_agreement": 0.75},
}
GATE_NAMES = ("max_perplexity_ratio", "min_top1_agreement", "max_mean_kl", "min_greedy_prefix")
WHAT_TO_TRY = {
    "int4": "Try a higher precision (int8 on cpu, fp16 on cuda), `olive.extra_options: {int4_accuracy_level: 4}` "
    "or a smaller `int4_block_size` (32 or 16).",
    "int8": "Try fp32, or int4 with `olive.extra_options: {int4_accuracy_level: 4}`.",
    "fp16": "Try bf16 or fp32: some models overflow in fp16.",
    "bf16": "Try fp32.",
    "fp32": "An fp32 conversion should match its source: check `olive.passes` and the model's architecture support.",
}


@dataclass(frozen=True)
class Settings:
    """What the recipe's ``evaluate:`` section asks for (the plan carries it as JSON)."""

    enabled: bool = True
    gates: dict[str, float] = field(default_factory=dict)  # overrides of DEFAULT_GATES
    text: str | None = None  # a local text file; None: the committed text
    max_tokens: int = DEFAULT_MAX_TOKENS
    speed: bool = True
    text_source: str | None = None  # what ``text`` is a copy of (a Hub dataset file: hub_text_label)

    @classmethod
    def from_json(cls, data: Any) -> Settings:
        if data is None:
            return cls()
        if data is False:
            return cls(enabled=False)
        return cls(
            enabled=bool(data.get("enabled", True)),
            gates={k: float(v) for k, v in (data.get("gates") or {}).items()},
            text=data.get("text"),
            max_tokens=int(data.get("max_tokens") or DEFAULT_MAX_TOKENS),
            speed=bool(data.get("speed", True)),
            text_source=data.get("text_source"),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def gates_for(precision: str | None, overrides: dict[str, float] | None = None) -> dict[str, float]:
    gates = dict(DEFAULT_GATES.get(precision or "", {}))
    gates.update(overrides or {})
    return gates


def applicable_gates(acc: dict[str, Any], precision: str | None, overrides: dict[str, float] | None,
                     vocab: int) -> dict[str, float]:
    """The gates for ``precision`` (with the recipe's overrides) that mean something for these figures.

    A source that predicts the text barely better than uniformly (random weights, or a text in
    a script it never saw) has no meaningful top-1 token: its argmax is noise, so agreement
    gates would fail any conversion. Those are dropped (and ``acc`` says so); the perplexity
    and KL gates still apply."""
    gates = gates_for(precision, overrides)
    if vocab and acc.get("source_perplexity", 0) > UNINFORMED * vocab:
        skipped = [g for g in ("min_top1_agreement", "min_greedy_prefix") if g in gates]
        for gate in skipped:
            del gates[gate]
        acc["gates_skipped"] = (f"{', '.join(skipped)}: the source's perplexity {acc['source_perplexity']:g} is "
                                f"over {UNINFORMED:g} x its vocabulary ({vocab}); its top-1 choices are noise")
    return gates


def check_gates(acc: dict[str, Any], gates: dict[str, float]) -> list[str]:
    failures = []
    checks = (
        ("max_perplexity_ratio", "perplexity_ratio", "perplexity ratio (built / source)", False),
        ("min_top1_agreement", "top1_agreement", "top-1 next-token agreement", True),
        ("max_mean_kl", "mean_kl", "mean KL divergence", False),
        ("min_greedy_prefix", "greedy_prefix_mean", "mean greedy common prefix (tokens)", True),
    )
    for gate, metric, label, at_least in checks:
        if gate not in gates or metric not in acc:
            continue
        value, limit = float(acc[metric]), float(gates[gate])
        bad = value < limit if at_least else (value > limit or math.isnan(value))
        if bad:
            failures.append(f"{label} {value:g} is {'below' if at_least else 'above'} the limit {limit:g} ({gate})")
    return failures


def raise_for_gates(result: EvaluationRecord | dict[str, Any]) -> None:
    data = result.to_json() if isinstance(result, EvaluationRecord) else result
    if not data.get("failures"):
        return
    precision = data.get("precision") or "this precision"
    figures = format_table(data)
    raise EvaluationError(
        f"The built model failed its evaluation gates ({precision}):\n"
        + "\n".join(f"  - {f}" for f in data["failures"])
        + f"\n\n{figures}",
        hint=WHAT_TO_TRY.get(str(data.get("precision")), "Try a higher precision.")
        + " To change the limits, set `evaluate.gates` in the recipe; `evaluate: false` skips the stage.",
        figures=data,
    )

