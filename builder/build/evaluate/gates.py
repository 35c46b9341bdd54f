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

# Limits per target precision, calibrated on a real model: SmolLM2-135M-Instruct from a Q4_1 GGUF,
# measured against its dequantized weights on the committed text (1,023 tokens). Reproduce with
#   OLIVE_BUILDER_EVAL_CACHE=DIR python benchmarks/calibrate_real.py --source HF_DIR --fp32 ONNX_DIR \
#       --also INT8_DIR --also INT4_DIR
# (an fp32 conversion, then copies with Gaussian noise of k x each MatMul weight's own std).
# Figures are ppl ratio / top-1 / mean KL; they do not depend on the precision, only the limits do:
#   correct: fp32 1.0 / 1.0 / 0; block int4 1.0 / 1.0 / 0 (accuracy_level 0) and 1.0026 / 0.983 /
#   0.0008 (level 4); block int8 1.0052-1.0065 / 0.954-0.986 / 0.0011-0.0038.
#   noise k=0.005: 0.9965 / 0.975 / 0.0014; 0.01: 0.9957 / 0.938 / 0.0057; 0.02: 1.0026 / 0.882 /
#   0.023; 0.05: 1.103 / 0.719 / 0.141; 0.1: 1.85 / 0.478 / 0.61; 0.2: 50 / 0.17 / 3.5.
# The perplexity ratio cannot see small damage (it even drops below 1 at k <= 0.01); mean KL
# grows with k squared and top-1 falls with it, so those two do the separating. Damaged copies
# fail from k=0.005 at fp32, 0.01 at fp16, 0.02 at bf16 and int8, 0.1 at int4. Margins of the
# worst correct figure: int8 top-1 0.054, KL 5x; int4 (block) top-1 0.28, KL 250x. The int4
# limits are deliberately loose: this GGUF model is already on a 4-bit grid, so block int4 is
# near exact here, while a 4-bit round-to-nearest of fp16 weights (the model builder's int4 on a
# Hub model; not measurable offline) is assumed to err like noise k ~ 0.05 (a 4-bit step over a
# block of 32 is ~0.25 of its std, error step/sqrt(12)), which these limits accept with a thin
# margin. The model builder's int4 of this GGUF model (1.276 / 0.594 / 0.33: a second 4-bit grid
# over the first) fails them. fp16/bf16 could not be built for a CPU here: interpolated between
# fp32 and int8 by their rounding (fp16 ~k 0.0003, bf16 ~k 0.003 plus bf16 activations), not measured.
# The toy model's figures (`python benchmarks/bench_eval.py --calibrate`) pass these limits too.
DEFAULT_GATES: dict[str, dict[str, float]] = {
    "fp32": {"max_perplexity_ratio": 1.001, "min_top1_agreement": 0.98, "max_mean_kl": 0.001},
    "fp16": {"max_perplexity_ratio": 1.01, "min_top1_agreement": 0.95, "max_mean_kl": 0.005},
    "bf16": {"max_perplexity_ratio": 1.01, "min_top1_agreement": 0.93, "max_mean_kl": 0.01},
    "int8": {"max_perplexity_ratio": 1.05, "min_top1_agreement": 0.90, "max_mean_kl": 0.02},
    "int4": {"max_perplexity_ratio": 1.15, "min_top1_agreement": 0.70, "max_mean_kl": 0.2},
}
GATE_NAMES = ("max_perplexity_ratio", "min_top1_agreement", "max_mean_kl", "min_greedy_prefix")
WHAT_TO_TRY = {
    "int4": "Tune the recipe's `quantize:` section (cpu, block method): `quantize: {block_size: 16}`, "
    "`lm_head: int8`, `accuracy_level: 0`; or a higher precision (int8 on cpu, fp16 on cuda).",
    "int8": "Tune the recipe's `quantize:` section (cpu, block method): `quantize: {block_size: 16}`, "
    "`lm_head: int8`, `accuracy_level: 0`; or a higher precision (fp32).",
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

