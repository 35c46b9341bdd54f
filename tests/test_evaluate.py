"""The evaluation stage's pure parts: settings, gates, verdicts, records, annotations, recipes.

No model runs here (see test_evaluate_integration.py for that)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from builder.build import evaluate as ev
from builder.build import measure
from builder.build.evaluate import gates as ev_gates
from builder.build.evaluate import report as ev_report
from builder.errors import BuildError, EvaluationError, RecipeError
from conftest import write_recipe

REPO = Path(__file__).resolve().parent.parent


def record(**acc: float) -> dict:  # type: ignore[type-arg]
    base = {"perplexity": 11.0, "source_perplexity": 10.0, "perplexity_ratio": 1.1, "top1_agreement": 0.9,
            "mean_kl": 0.02, "greedy_prefix_mean": 12.0}
    base.update(acc)
    result = ev.EvaluationRecord(evaluated=True, precision="int4", accuracy=base,
                           text={"source": "x", "digest": "sha256:" + "0" * 64, "tokens": 2046, "windows": 2},
                           speed={"measured": True, "load_s": 0.5, "ttft_s": 0.2, "prompt_tokens": 512,
                                  "prompt_tokens_per_s": 2560.0, "decode_tokens_per_s": 40.0, "peak_rss_mb": 900.0,
                                  "cpu": {"model": "Some CPU", "usable_cores": 2}, "intra_op_threads": 2},
                           gates=ev_gates.gates_for("int4"))
    result.failures = ev_gates.check_gates(result.accuracy, result.gates)
    return result.to_json()


def test_the_committed_text_is_package_data_and_documented() -> None:
    text = measure.load_text()
    assert 80_000 <= len(text.text) <= 110_000  # about 20k tokens of a real tokenizer
    raw = (REPO / "builder" / "data" / "eval-text.txt").read_bytes()
    assert text.digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    notice = (REPO / "builder" / "data" / "README.md").read_text()
    assert text.digest.split(":")[1] in notice and "public domain" in notice
    assert '"data/*.txt"' in (REPO / "pyproject.toml").read_text()


def test_a_text_file_that_is_missing_short_or_not_utf8_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="Cannot read"):
        measure.load_text(tmp_path / "missing.txt")
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(EvaluationError, match="too short"):
        measure.load_text(tmp_path / "short.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(EvaluationError, match="not UTF-8"):
        measure.load_text(tmp_path / "latin1.txt")


def test_default_gates_per_precision_and_overrides() -> None:
    assert ev_gates.gates_for("fp32")["max_perplexity_ratio"] == 1.001
    assert ev_gates.gates_for("fp16")["max_perplexity_ratio"] == ev_gates.gates_for("bf16")["max_perplexity_ratio"] == 1.01
    assert ev_gates.gates_for("int8")["max_perplexity_ratio"] == 1.05
    assert ev_gates.gates_for("int4")["max_perplexity_ratio"] == 1.15
    assert all("min_top1_agreement" in ev_gates.gates_for(p) for p in ("fp32", "fp16", "bf16", "int8", "int4"))
    assert ev_gates.gates_for("int4", {"max_perplexity_ratio": 1.3, "max_mean_kl": 0.1}) == {
        "max_perplexity_ratio": 1.3, "min_top1_agreement": ev_gates.DEFAULT_GATES["int4"]["min_top1_agreement"],
        "max_mean_kl": 0.1}


def test_settings_from_the_plan() -> None:
    assert ev.Settings.from_json(None) == ev.Settings()
    assert not ev.Settings.from_json(False).enabled
    assert not ev.Settings.from_json({"enabled": False}).enabled
    s = ev.Settings.from_json({"enabled": True, "gates": {"max_perplexity_ratio": 2}, "max_tokens": 512, "speed": False})
    assert s.gates == {"max_perplexity_ratio": 2.0} and s.max_tokens == 512 and not s.speed


def test_gates_pass_and_fail_with_figures_limit_and_what_to_try() -> None:
    ok = record()
    assert ok["passed"] and ok["failures"] == []
    ev.raise_for_gates(ok)  # no error

    bad = record(perplexity_ratio=1.4, top1_agreement=0.5)
    assert not bad["passed"] and len(bad["failures"]) == 2
    with pytest.raises(EvaluationError) as info:
        ev.raise_for_gates(bad)
    e = info.value
    assert isinstance(e, BuildError) and e.exit_code == 4
    text = str(e)
    assert "perplexity ratio (built / source) 1.4 is above the limit 1.15" in text
    assert "top-1 next-token agreement 0.5 is below the limit 0.7" in text
    assert "quantize: {block_size: 16}" in text and "accuracy_level: 0" in text  # what to try
    assert "higher precision" in text
    assert "perplexity_ratio" in text and "(limit <= 1.15)" in text  # the figures' table
    assert e.figures["accuracy"]["perplexity_ratio"] == 1.4


def test_nan_perplexity_fails_a_max_gate() -> None:
    assert ev_gates.check_gates({"perplexity_ratio": float("nan")}, {"max_perplexity_ratio": 1.1})


def test_the_table_and_the_annotations() -> None:
    data = record()
    table = ev.format_table(data)
    for word in ("perplexity_ratio", "top1_agreement", "mean_kl", "decode_tokens_per_s", "peak_rss_mb", "Some CPU",
                 "passed"):
        assert word in table
    ann = ev.manifest_annotations(data, "org.olive-builder.")
    assert ann["org.olive-builder.eval"] == "passed"
    assert ann["org.olive-builder.eval.perplexity-ratio"] == "1.1"
    assert ann["org.olive-builder.eval.top1-agreement"] == "0.9"
    assert ann["org.olive-builder.eval.text-digest"] == "sha256:" + "0" * 64
    assert json.loads(ann["org.olive-builder.eval.gates"]) == ev_gates.gates_for("int4")
    # The speed is what one machine observed: no manifest annotation; the evaluation attestation
    # carries it, and `build inspect` shows it under the names the annotations had.
    assert not [k for k in ann if k.startswith("org.olive-builder.bench")]
    seen = ev_report.observed_figures({"evaluation": data})
    assert seen["bench.decode-tokens-per-s"] == "40"
    assert seen["bench.cpu"] == "Some CPU, 2 cores"
    assert all(isinstance(v, str) for v in ann.values())


def test_not_evaluated_and_not_measured_say_why() -> None:
    off = ev.not_evaluated("turned off in the recipe (`evaluate: false`)")
    assert ev.format_table(off).startswith("not evaluated: turned off")
    assert ev.manifest_annotations(off) == {
        "org.olive-builder.eval": "not evaluated",
        "org.olive-builder.eval.reason": "turned off in the recipe (`evaluate: false`)",
    }
    data = record()
    data["speed"] = {"measured": False, "reason": "speed not measured: target device cuda, but no GPU"}
    assert ev_report.observed_figures({"evaluation": data})["bench"].startswith("speed not measured: target device cuda")
    assert "org.olive-builder.bench" not in ev.manifest_annotations(data)
    assert "speed not measured" in ev.format_table(data)
    assert ev.manifest_annotations(None) == {}


def test_package_annotations_carry_the_evaluation() -> None:
    import datetime as dt

    from builder.publish.package import manifest_annotations

    info = {"name": "m", "version": "1", "tags": ["m:1-cpu-int4"], "target": {"precision": "int4"},
            "evaluation": record()}
    ann = manifest_annotations(info, dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    assert ann["org.olive-builder.eval.perplexity-ratio"] == "1.1"
    assert "org.olive-builder.bench.ttft-s" not in ann  # observed, not built: in the evaluation attestation


def test_windows_are_capped_and_start_with_bos() -> None:
    ids = list(range(10, 5010))
    windows = measure._windows(ids, 2048, 1024, None)
    assert [len(w) for w in windows] == [1024, 1024]
    with_bos = measure._windows(ids, 2048, 1024, 1)
    assert all(w[0] == 1 and len(w) <= 1024 for w in with_bos) and sum(len(w) - 1 for w in with_bos) == 2048
    assert measure._windows(ids[:3], 2048, 1024, None) == [ids[:3]]


# ---- the recipe's `evaluate:` section ----------------------------------------------------------

BASE = """
name: tiny
version: "1.0"
model:
  path: ./model
target:
  device: cpu
  precision: int4
"""


def load(tmp_path: Path, extra: str) -> object:
    from builder.recipe import format as recipe

    (tmp_path / "recipes" / "tiny" / "model").mkdir(parents=True, exist_ok=True)
    return recipe.load(write_recipe(tmp_path / "recipes" / "tiny", "cpu-int4", BASE + extra))


def test_recipe_evaluate_false_and_default(tmp_path: Path) -> None:
    from builder.recipe.plan import evaluate_settings

    assert evaluate_settings(load(tmp_path, "")) == {"enabled": True}  # type: ignore[arg-type]
    assert evaluate_settings(load(tmp_path, "evaluate: false\n")) == {"enabled": False}  # type: ignore[arg-type]


def test_recipe_evaluate_section_reaches_the_plan(tmp_path: Path) -> None:
    from builder.recipe.plan import plan

    (tmp_path / "recipes" / "tiny").mkdir(parents=True, exist_ok=True)
    (tmp_path / "recipes" / "tiny" / "text.txt").write_text("words " * 100)
    loaded = load(tmp_path, "evaluate:\n  gates:\n    max_perplexity_ratio: 1.2\n    min_top1_agreement: 0.8\n"
                            "  text: text.txt\n  max_tokens: 1024\n  speed: false\n")
    step = plan(loaded, "img")  # type: ignore[arg-type]
    assert step.evaluate == {"enabled": True, "gates": {"max_perplexity_ratio": 1.2, "min_top1_agreement": 0.8},
                             "text": str((tmp_path / "recipes" / "tiny" / "text.txt").resolve()),
                             "max_tokens": 1024, "speed": False}
    assert ev.Settings.from_json(step.to_json()["evaluate"]).gates["max_perplexity_ratio"] == 1.2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("evaluate:\n  gates:\n    max_perplexity: 1.2\n", "Perhaps you meant `max_perplexity_ratio`?"),
        ("evaluate:\n  gates:\n    max_perplexity_ratio: 0.5\n", "evaluate.gates.max_perplexity_ratio"),
        ("evaluate:\n  gates:\n    min_top1_agreement: 2\n", "evaluate.gates.min_top1_agreement"),
        ("evaluate:\n  max_tokens: 10\n", "evaluate.max_tokens"),
        ("evaluate:\n  text: nowhere.txt\n", "nowhere.txt is not a file"),
        ("evaluate: maybe\n", "evaluate: Input should be a valid dictionary"),
    ],
)
def test_recipe_evaluate_mistakes_are_named(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(RecipeError) as info:
        load(tmp_path, extra)
    assert message in str(info.value)
    assert "cpu-int4.yaml:" in str(info.value)


def test_agreement_gates_are_not_applied_to_a_source_that_knows_nothing() -> None:
    """A near-uniform source (random weights): its argmax is noise, so only the other gates apply."""
    acc = {"source_perplexity": 900.0, "perplexity_ratio": 1.01, "top1_agreement": 0.07}
    gates = ev_gates.applicable_gates(acc, "int4", {"min_greedy_prefix": 4}, vocab=1024)
    assert gates == {"max_perplexity_ratio": 1.15, "max_mean_kl": 0.2}
    assert ev_gates.check_gates(acc, gates) == []
    assert "its top-1 choices are noise" in acc["gates_skipped"]
    acc = {"source_perplexity": 60.0, "perplexity_ratio": 1.01, "top1_agreement": 0.07}
    assert "min_top1_agreement" in ev_gates.applicable_gates(acc, "int4", None, vocab=1024)
    assert ev_gates.check_gates(acc, ev_gates.applicable_gates(acc, "int4", None, vocab=1024))


# ---- an evaluation text from the Hub ------------------------------------------------------------

TEXT_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_texts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """tests/fake_hub.py serving a dataset repository acme/texts at TEXT_COMMIT (its request log)."""
    from conftest import fake_hub_datasets

    repo = tmp_path / "hub-texts"
    (repo / "books").mkdir(parents=True)
    (repo / "books" / "coriolanus.txt").write_bytes((REPO / "builder" / "data" / "eval-text.txt").read_bytes()[:20000])
    with fake_hub_datasets(tmp_path, monkeypatch, {"acme/texts": (repo, TEXT_COMMIT)}) as log:
        yield log


def test_a_hub_text_is_named_by_a_pinned_commit() -> None:
    spec = ev.HubText.from_json({"hub": "acme/texts", "revision": TEXT_COMMIT, "file": "books/a.txt"})
    assert spec.label == "Hugging Face dataset acme/texts@0123456789ab: books/a.txt"
    bad = [({"hub": "acme/texts", "revision": "main", "file": "a.txt"}, "is not a commit"),
           ({"hub": "acme/texts", "revision": TEXT_COMMIT, "file": "../a.txt"}, "not a path inside"),
           ({"hub": "acme/texts", "revision": TEXT_COMMIT, "file": "/etc/passwd"}, "not a path inside"),
           ({"hub": "no-owner", "revision": TEXT_COMMIT, "file": "a.txt"}, "not a Hub dataset id"),
           ({"hub": "acme/texts", "revision": TEXT_COMMIT, "file": "a.txt", "split": "x"}, "nothing else")]
    for data, message in bad:
        with pytest.raises(EvaluationError, match=message):
            ev.HubText.from_json(data)
    settings = ev.Settings.from_json({"text": "/cache/a.txt", "text_source": spec.label})
    assert settings.text_source == spec.label and ev.Settings.from_json(settings.to_json()) == settings


def test_a_hub_text_is_fetched_once_and_recorded_by_its_origin_and_digest(hub_texts: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ev.HubText("acme/texts", TEXT_COMMIT, "books/coriolanus.txt")
    path = spec.fetch()
    text = measure.load_text(path, spec.label)
    raw = (REPO / "builder" / "data" / "eval-text.txt").read_bytes()[:20000]
    assert text.digest == "sha256:" + hashlib.sha256(raw).hexdigest() and text.source == spec.label
    assert spec.fetch() == path  # a commit never changes: the second build reads the copy
    requested = [json.loads(line)["path"] for line in hub_texts.read_text().splitlines()]
    assert requested == [f"/datasets/acme/texts/resolve/{TEXT_COMMIT}/books/coriolanus.txt"]

    with pytest.raises(EvaluationError, match="404") as missing:
        ev.HubText("acme/texts", TEXT_COMMIT, "books/missing.txt").fetch()
    assert "evaluate.text" in (missing.value.hint or "")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvaluationError, match="HF_HUB_OFFLINE"):
        ev.HubText("acme/texts", TEXT_COMMIT, "books/other.txt").fetch()


# The calibration figures (README "Default gates"): what each default gate was chosen between.
# (precision, perplexity ratio, top-1, mean KL, passes)
REAL_MODEL_CALIBRATION = [  # SmolLM2-135M-Instruct from its GGUF: benchmarks/calibrate_real.py
    ("fp32", 1.0, 1.0, 0.0, True),            # the fp32 conversion
    ("int4", 1.0026, 0.983, 0.0008, True),    # block int4, accuracy_level 4 (the default)
    ("int8", 1.0065, 0.954, 0.0038, True),    # block int8, accuracy_level 4 (the default)
    ("int4", 1.276, 0.594, 0.33, False),      # the model builder's int4 of the same weights
    ("fp32", 0.9965, 0.9746, 0.00144, False),  # noise k = 0.005
    ("int8", 1.0026, 0.8817, 0.0228, False),  # noise k = 0.02
    ("int4", 1.852, 0.478, 0.614, False),     # noise k = 0.1
]
TOY_CALIBRATION = [  # the 64-wide model of the tests, trained on the text: bench_eval.py --calibrate
    ("fp32", 1.0, 1.0, 0.0, True),
    ("int8", 0.99921, 0.9726, 0.0005, True),
    ("int4", 0.99946, 0.8935, 0.0066, True),
    ("fp32", 3.4355, 0.2268, 1.28, False),    # 100 % noise
    ("int8", 1.2749, 0.7214, 0.26, False),
    ("int4", 12.749, 0.1584, 3.02, False),
]


@pytest.mark.parametrize(("precision", "ratio", "top1", "kl", "passes"), REAL_MODEL_CALIBRATION + TOY_CALIBRATION)
def test_the_default_gates_separate_the_calibration_figures(precision: str, ratio: float, top1: float, kl: float,
                                                            passes: bool) -> None:
    figures = {"perplexity_ratio": ratio, "top1_agreement": top1, "mean_kl": kl}
    assert (ev_gates.check_gates(figures, ev_gates.gates_for(precision)) == []) == passes
