"""The evaluation of a build as an in-toto Statement v1 with the test-result v0.1 predicate:
PASSED when its gates held, FAILED with the failures when not, WARNED when it was not evaluated.

The figures themselves travel in the configuration's annotations (test-result has no field
for them). An adapter artifact's statement is the build's evaluation where it loaded this
adapter, else WARNED: the base model's evaluation is not the adapter's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from builder.contract import TEST_RESULT_V01
from builder.trust.facts import (
    AdapterFacts,
    BuildFacts,
    Subject,
    adapter_evaluation_section,
    evaluation_results,
    statement,
)


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
    predicate = {
        "result": result,
        "configuration": [{"name": "olive-builder evaluation", "annotations": notes}],
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
    st = evaluation(BuildFacts({**info, "evaluation": section}, (), facts.created), [subject])
    st["predicate"]["configuration"][0]["annotations"]["adapter"] = facts.name
    return st
