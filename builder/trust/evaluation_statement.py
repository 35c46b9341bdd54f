"""The evaluation of a build as an in-toto Statement v1 with the test-result v0.1 predicate:
PASSED when its gates held, FAILED with the failures when not, WARNED when it was not evaluated.

The figures themselves travel in the configuration's annotations (test-result has no field
for them): ``results``, the evaluation as the build record holds it (what was built: the
accuracy figures, gates, verdict, text digest, the same in every rebuild), and ``observed``,
what the build's run observed on its machine (speed, seconds, the CPU, cache state;
``builder.build.observed``), which the artifact itself never holds. This statement is where
`build inspect` finds the speed (``attached_observations``). An adapter artifact's statement is
the build's evaluation where it loaded this adapter, else WARNED: the base model's evaluation is
not the adapter's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from builder.build.observed import EVALUATION_OBSERVED
from builder.contract import TEST_RESULT_V01
from builder.oci import layout as oci
from builder.oci.media import MANIFEST
from builder.oci.referrers import Content
from builder.oci.referrers import describe as describe_referrers
from builder.trust.facts import (
    AdapterFacts,
    BuildFacts,
    Subject,
    adapter_evaluation_section,
    adapter_observed,
    evaluation_results,
    statement,
)

CONFIGURATION = "olive-builder evaluation"  # the name of the predicate's one configuration


def evaluation_passed(section: Mapping[str, Any] | None) -> bool | None:
    """True/False from the build record's ``evaluation`` (see ``builder.build.evaluate``); None when it was
    not evaluated."""
    if not section or section.get("evaluated") is False:
        return None
    if isinstance(section.get("passed"), bool):
        return bool(section["passed"])
    if isinstance(section.get("failures"), list):
        return not section["failures"]
    return None


def evaluation(facts: BuildFacts, subjects: Iterable[Subject]) -> dict[str, Any]:
    """The build's evaluation (and its check) as an in-toto test-result statement: PASSED when the
    gates held, FAILED with the failures when not, WARNED when it was not evaluated."""
    info = facts.info
    section = evaluation_results(info)
    passed = evaluation_passed(section)
    check = info.get("check") or {}
    passed_tests: list[str] = []
    failed_tests: list[str] = []
    warned: list[str] = []
    if check:
        (passed_tests if check.get("ok", True) else failed_tests).append("check: loads and generates")
    if passed is None:
        reason = (section or {}).get("reason")
        warned.append("evaluation: not evaluated" + (f" ({reason})" if reason else ""))
    else:
        gates = (section or {}).get("gates") or {}
        failed_tests.extend(f"evaluation: {f}" for f in (section or {}).get("failures") or [])
        if passed:
            passed_tests.extend(f"gate: {name} {limit}" for name, limit in sorted(gates.items()))
        elif not failed_tests:
            failed_tests.append("evaluation: failed")
    result = "FAILED" if failed_tests else ("WARNED" if warned else "PASSED")
    # test-result v0.1 has no field for figures: they travel as the configuration's annotations.
    notes: dict[str, Any] = {"target": info.get("id"), "evaluated": passed is not None}
    if section is not None:
        notes["results"] = section
    if check:
        notes["check"] = dict(check)
    if facts.observed:
        notes["observed"] = dict(facts.observed)
    predicate = {
        "result": result,
        "configuration": [{"name": CONFIGURATION, "annotations": notes}],
        "url": "https://github.com/olive-builder/olive-builder#evaluation",
        "passedTests": passed_tests,
        "warnedTests": warned,
        "failedTests": failed_tests,
    }
    return statement(subjects, TEST_RESULT_V01, predicate)


def adapter_evaluation(facts: AdapterFacts, subject: Subject) -> dict[str, Any]:
    """The test-result statement of an adapter artifact: the build's evaluation where it loaded this
    adapter (PASSED/FAILED), else WARNED ("not evaluated"): the base's evaluation is not the adapter's."""
    section = adapter_evaluation_section(facts)
    if section is None:
        section = {"evaluated": False, "reason": f"the build's evaluation did not load the adapter {facts.name!r}"}
    info = {k: v for k, v in facts.info.items() if k not in ("evaluation", "eval", "check")}
    st = evaluation(BuildFacts({**info, "evaluation": section}, (), facts.created, observed=adapter_observed(facts)),
                    [subject])
    st["predicate"]["configuration"][0]["annotations"]["adapter"] = facts.name
    return st


# ---- reading what a run observed back ------------------------------------------------------------

def observed_in(document: bytes | Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``observed`` annotations of an evaluation statement (as written by ``evaluation`` or
    ``adapter_evaluation``); None when it has none. Statements of builds made before the speed left
    the artifact hold it in ``results``: it is returned the same way."""
    try:
        st = json.loads(document) if isinstance(document, bytes) else document
        notes = st["predicate"]["configuration"][0]["annotations"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(notes, dict):
        return None
    if isinstance(notes.get("observed"), dict):
        return dict(notes["observed"])
    results = notes.get("results")
    if isinstance(results, dict) and isinstance(results.get("speed"), dict):
        return {"evaluation": {k: results[k] for k in EVALUATION_OBSERVED if k in results}}
    return None


def attached_observations(content: Content, digest: str) -> list[tuple[str, dict[str, Any]]]:
    """(referrer digest, observed) of every evaluation statement attached to the manifest ``digest``
    that says what its run observed: one per build run that packaged this very artifact."""
    out = []
    for row in describe_referrers(content, digest):
        if row["kind"] != "evaluation":
            continue
        manifest = content.manifest(oci.Descriptor(MANIFEST, str(row["digest"]), int(row["size"])))
        for layer in manifest.get("layers") or []:
            seen = observed_in(bytes(content.blob(oci.Descriptor.from_json(layer))))
            if seen is not None:
                out.append((str(row["digest"]), seen))
    return out
