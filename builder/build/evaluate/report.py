"""The evaluation's record (``EvaluationRecord``), read as a table (``format_table``, ``build
eval``) and as manifest annotations (``manifest_annotations``: ``<ns>eval.*``, read back by
``build inspect`` with ``table_from_annotations``).

Only what was built goes into olive-builder.json and the annotations: the accuracy figures, the
gates, the verdict, the text digest. What one run observed (the speed on this machine, seconds,
timings, whether the source figures were cached; ``builder.build.observed``) travels in the
evaluation attestation, and ``observed_figures`` shows it the way the ``<ns>bench.*``
annotations of earlier builds did.

Stdlib only: the worker writes the record inside the builder image.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from builder.contract import NS

RECORD_PREFIX = "::olive-builder-evaluation:: "  # the record on one line of output (``--record-line``)


@dataclass
class EvaluationRecord:
    """The figures, the gates and the verdict, as the worker reports them. The build record keeps
    what was built; ``speed``, ``seconds``, ``timings`` and ``source_cached`` are what this run
    observed (``builder.build.observed.split_evaluation``).

    (The recipe's ``evaluate:`` section, what the stage is asked to do, is
    ``builder.recipe.format.Evaluation``.)"""

    evaluated: bool
    precision: str | None = None
    text: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, Any] = field(default_factory=dict)
    speed: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per part: source, built, speed
    reason: str | None = None  # why not evaluated
    adapter: dict[str, Any] | None = None  # the adapter evaluated (AdapterUnderTest.to_json()); None: the base model
    source_cached: bool = False  # the source's figures came from the cache (an earlier build of the same source)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        return out


def not_evaluated(reason: str) -> dict[str, Any]:
    return EvaluationRecord(evaluated=False, reason=reason).to_json()



def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def _adapter_label(adapter: dict[str, Any]) -> str:
    if adapter.get("mode") == "merged":
        return f"{adapter.get('name')} (merged into the weights)"
    return f"{adapter.get('name')} ({adapter.get('file')}, {str(adapter.get('sha256', ''))[:19]})"


def format_table(data: dict[str, Any]) -> str:
    """A readable table of an evaluation record (olive-builder.json's `evaluation`)."""
    if not data or not data.get("evaluated"):
        return f"not evaluated{': ' + str(data.get('reason')) if data and data.get('reason') else ''}"
    rows: list[tuple[str, str]] = []
    if data.get("adapter"):
        rows.append(("adapter", _adapter_label(data["adapter"])))
    acc, gates = data.get("accuracy") or {}, data.get("gates") or {}
    limits = {"perplexity_ratio": "max_perplexity_ratio", "top1_agreement": "min_top1_agreement",
              "mean_kl": "max_mean_kl", "greedy_prefix_mean": "min_greedy_prefix"}
    for key, value in acc.items():
        gate = limits.get(key)
        limit = ""
        if gate and gate in gates:
            limit = f"{'<=' if gate.startswith('max') else '>='} {gates[gate]:g}"
        rows.append((key, _fmt(value) + (f"   (limit {limit})" if limit else "")))
    if data.get("source_cached"):
        rows.append(("source_figures", "from the cache (an earlier evaluation of the same source, tokens and tools)"))
    text = data.get("text") or {}
    rows.append(("text", f"{text.get('tokens')} tokens in {text.get('windows')} window(s), {text.get('digest', '')[:19]}"))
    speed = data.get("speed") or {}
    if speed.get("measured"):
        for key in ("load_s", "ttft_s", "prompt_tokens", "prompt_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb",
                    "intra_op_threads"):
            rows.append((key, _fmt(speed.get(key))))
        rows.append(("cpu", _fmt(speed.get("cpu"))))
    else:
        rows.append(("speed", str(speed.get("reason", "not measured"))))
    rows.append(("verdict", "passed" if not data.get("failures") else "FAILED: " + "; ".join(data["failures"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


ANNOTATED_EVAL = ("perplexity", "source_perplexity", "perplexity_ratio", "top1_agreement", "mean_kl",
                  "greedy_prefix_mean")
ANNOTATED_BENCH = ("load_s", "ttft_s", "prompt_tokens", "prompt_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb")


def manifest_annotations(data: dict[str, Any] | None, ns: str = NS) -> dict[str, str]:
    """``<ns>eval.<metric>`` for the manifests: what was built, never what a run observed (the speed
    is in the evaluation attestation, see ``observed_figures``), so a rebuild annotates alike."""
    if not data:
        return {}
    if not data.get("evaluated"):
        return {ns + "eval": "not evaluated", **({ns + "eval.reason": str(data["reason"])} if data.get("reason") else {})}
    out = {ns + "eval": "passed" if not data.get("failures") else "failed"}
    if data.get("adapter"):
        out[ns + "eval.adapter"] = _adapter_label(data["adapter"])
    acc = data.get("accuracy") or {}
    out.update({f"{ns}eval.{k.replace('_', '-')}": _fmt(acc[k]) for k in ANNOTATED_EVAL if k in acc})
    text = data.get("text") or {}
    if text.get("digest"):
        out[ns + "eval.text-digest"] = str(text["digest"])
        out[ns + "eval.text-tokens"] = str(text.get("tokens"))
    if data.get("gates"):
        out[ns + "eval.gates"] = json.dumps(data["gates"], sort_keys=True, separators=(",", ":"))
    return out


def observed_figures(observed: Mapping[str, Any]) -> dict[str, str]:
    """What a run observed (an observed document, ``builder.build.observed``) as rows named like the
    ``bench.*`` annotations of earlier builds: ``bench.<metric>``, ``bench.cpu``, ``bench.threads``
    (or ``bench``: why not measured), the evaluation's ``eval.seconds`` and ``eval.source-cached``,
    the conversion's ``convert.seconds`` and each adapter's ``adapter.<name>.training-seconds``."""
    out: dict[str, str] = {}
    found = observed.get("evaluation")
    evaluation: dict[str, Any] = found if isinstance(found, dict) else {}
    speed = evaluation.get("speed") or {}
    if speed.get("measured"):
        out.update({f"bench.{k.replace('_', '-')}": _fmt(speed[k]) for k in ANNOTATED_BENCH if k in speed})
        cpu = speed.get("cpu") or {}
        out["bench.cpu"] = f"{cpu.get('model')}, {cpu.get('usable_cores')} cores"
        out["bench.threads"] = str(speed.get("intra_op_threads"))
    elif speed:
        out["bench"] = str(speed.get("reason", "not measured"))
    if "seconds" in evaluation:
        out["eval.seconds"] = _fmt(evaluation["seconds"])
    if "source_cached" in evaluation:
        out["eval.source-cached"] = "yes" if evaluation["source_cached"] else "no"
    if observed.get("olive_seconds") is not None:
        out["convert.seconds"] = _fmt(observed["olive_seconds"])
    found = observed.get("finetune")
    finetune: dict[str, Any] = found if isinstance(found, dict) else {}
    for entry in finetune.get("adapters") or []:
        training = entry.get("training") if isinstance(entry, dict) else None
        if isinstance(training, dict) and "seconds" in training:
            out[f"adapter.{entry.get('name')}.training-seconds"] = _fmt(training["seconds"])
    return out


def table_from_annotations(ann: dict[str, str], ns: str = NS) -> str:
    """The evaluation part of a manifest's annotations as a table (for `build inspect`). Builds
    made before the speed moved to the evaluation attestation also carry ``<ns>bench.*``."""
    rows = [(k[len(ns):], v) for k, v in sorted(ann.items()) if k.startswith((ns + "eval", ns + "bench"))]
    if not rows:
        return "  not evaluated (built before the evaluation stage existed)"
    return _table(rows)


def observed_table(observed: Mapping[str, Any]) -> str:
    """``observed_figures`` as a table (for `build inspect`)."""
    rows = sorted(observed_figures(observed).items())
    return _table(rows) if rows else "  nothing observed"


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)

