"""The build, as run inside a builder container (or on the host by the local engine).

    python -m builder.build.worker SPEC.json

SPEC holds the planned BuildStep and the paths this process sees. The worker fetches the
model (Hub models through huggingface_hub, so the mounted cache is reused and the
revision is resolved to a commit), runs ``olive run`` on the planned config, moves
Olive's bookkeeping out of the model folder, checks the result, and writes
``WORK/meta/result.json``. Stdlib only, apart from what the builder image provides.

Lines starting with EVENT_PREFIX are progress events for the driver; everything else
it prints is the build log.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from builder.build.check import check_target
from builder.build.evaluate import Settings, evaluate, not_evaluated, raise_for_gates
from builder.build.measure import AdapterUnderTest, prefetch_reference, preload
from builder.contract import (
    ADAPTERS_DIR,
    CACHE_DIR,
    DATA_DIR,
    EVENT_PREFIX,
    MODEL_DIR,
    OUTPUT_DIR,
    RESULT_FILE,
    TOOL_DISTRIBUTIONS,
    BuildStep,
    ModelRef,
    RecordError,
    WorkerResult,
    WorkerSpec,
    adapter_file,
    atomic_write,
    sha256_file,
)
from builder.errors import BuilderError, CheckError
from builder.source.hub import HUB_IGNORE

# Olive writes these next to the model; they are build records, not part of the model.
OLIVE_BOOKKEEPING = ("footprint.json", "output_footprint.json", "run_history.txt", "model_config.json")
# Every distribution of the tools (either alternative), and the Hub client.
VERSIONED = (*(d for dists in TOOL_DISTRIBUTIONS.values() for d in dists), "huggingface_hub")


def event(stage: str, message: str) -> None:
    print(f"{EVENT_PREFIX} {json.dumps({'stage': stage, 'message': message})}", flush=True)


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


class WorkerFailure(Exception):
    def __init__(self, kind: str, message: str, hint: str = ""):
        super().__init__(message)
        self.kind, self.message, self.hint = kind, message, hint


def fetch_model(model: ModelRef, local_dir: str | None) -> tuple[str, str | None]:
    """The model folder to convert and, for Hub models, the commit it resolved to."""
    if model.path:
        folder = Path(local_dir or model.path)
        if not (folder / "config.json").is_file():
            raise WorkerFailure(
                "model_not_found",
                f"The model folder {model.path} has no config.json; it is not a Hugging Face model folder.",
            )
        return str(folder), None
    # The driver resolves a branch to a commit before the build (the cache key names it).
    repo, revision = str(model.hub), model.resolved or model.revision or "main"
    event("fetch", f"fetching {repo}@{revision} from the Hugging Face Hub")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:  # pragma: no cover
        raise WorkerFailure("internal", f"huggingface_hub is not installed: {e}") from None
    try:
        path = snapshot_download(repo, revision=revision, ignore_patterns=list(HUB_IGNORE))
    except GatedRepoError:
        raise WorkerFailure(
            "model_not_found",
            f"{repo} is gated: your Hugging Face account must accept its license first.",
            "Accept the license on the model's Hub page, then set HF_TOKEN to a token of that account.",
        ) from None
    except RevisionNotFoundError:
        raise WorkerFailure(
            "model_not_found",
            f"{repo} has no revision {revision!r}.",
            "Fix `model.revision` in the recipe (a branch, tag or commit of that repository).",
        ) from None
    except RepositoryNotFoundError:
        raise WorkerFailure(
            "model_not_found",
            f"The model {repo} was not found on the Hugging Face Hub (or it is private).",
            "Check `model.hub` in the recipe; for a private model set HF_TOKEN.",
        ) from None
    except LocalEntryNotFoundError as e:
        status = _http_status(e)
        if status is not None:  # the Hub answered, with an error: say which, not "unreachable"
            busy = status == 429 or status >= 500
            raise WorkerFailure(
                "model_not_found",
                f"The Hugging Face Hub answered {status} for {repo}@{revision}"
                + (" (too many requests)" if status == 429 else " (a server error)" if status >= 500 else "")
                + f", and it is not in the Hugging Face cache: {e}",
                "Wait a minute and build again (a token, HF_TOKEN, gets a higher rate limit)." if busy else
                "Check `model.hub` and `model.revision`, and HF_TOKEN for private or gated models.",
            ) from None
        raise WorkerFailure(
            "model_not_found",
            f"{repo}@{revision} is not in the Hugging Face cache and the Hub cannot be reached: {e}",
            "Connect to the Hub once, or point `model.path` at a local copy of the model.",
        ) from None
    except Exception as e:  # network errors and the like
        raise WorkerFailure("model_not_found", f"Fetching {repo}@{revision} failed: {e}") from None
    verify_locked_files(repo, Path(path), model.files or {})
    return path, Path(path).name  # the snapshot folder is named by its commit


def _http_status(error: BaseException) -> int | None:
    """The HTTP status behind a huggingface_hub error (it chains the answer it got), if any."""
    seen: BaseException | None = error
    for _ in range(5):
        if seen is None:
            return None
        response = getattr(seen, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return status
        seen = seen.__cause__ or seen.__context__
    return None


def verify_locked_files(repo: str, folder: Path, expected: dict[str, str]) -> None:
    """Files a lock file recorded (name -> sha256:...) must be there with the same content."""
    import hashlib

    for name, digest in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            raise WorkerFailure("model_not_found", f"{repo}: {name}, recorded in the lock file, is not in the download.",
                                "Run `build lock` again if the model changed on purpose.")
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(4 << 20):
                h.update(chunk)
        if "sha256:" + h.hexdigest() != digest:
            raise WorkerFailure("model_not_found", f"{repo}: {name} does not match the lock file ({digest}).",
                                "The Hub content changed under the same commit, or the cache is damaged; "
                                "clear the model from the Hugging Face cache, or run `build lock` again.")


def substitute(node: Any, values: dict[str, str]) -> Any:
    if isinstance(node, str):
        for key, value in values.items():
            node = node.replace(key, value)
        return node
    if isinstance(node, dict):
        return {k: substitute(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, values) for v in node]
    return node


def run(spec: WorkerSpec) -> dict[str, Any]:
    """The build; returns the fields of a successful WorkerResult (later stages add sections)."""
    step = spec.step
    work = Path(spec.work_dir)
    meta, output = work / "meta", work / "model"
    olive_cache = work / "olive-cache"
    for d in (meta, olive_cache):
        d.mkdir(parents=True, exist_ok=True)

    if os.environ.get("HF_TOKEN_PATH") or os.environ.get("HF_TOKEN"):
        event("auth", "a Hugging Face token is available to this build")
    model_dir, resolved = fetch_model(step.model, spec.model_dir)
    values = {MODEL_DIR: model_dir, OUTPUT_DIR: str(output), CACHE_DIR: str(olive_cache)}
    finetune = step.finetune
    if finetune:
        # The planned data_files name DATA_DIR/<i><suffix>; the dataset is where this process sees it.
        for i, seen in enumerate(finetune["dataset"].get("files") or []):
            values[f"{DATA_DIR}/{i}{Path(seen).suffix.lower()}"] = seen
    config = substitute(step.olive_config, values)
    config_path = meta / "olive-config.json"
    config_path.write_text(json.dumps(config, indent=2))

    env = dict(os.environ)
    env.update(
        {
            "CI": "1",  # Olive skips its telemetry heartbeat only when CI is set (~17 s)
            "OLIVE_DISABLE_TELEMETRY": "1",
            "HF_HUB_OFFLINE": "1",  # the model is local by now: nothing below may reach the Hub
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            # ModelBuilder keeps intermediates in the HF hub cache; keep them in the work dir.
            "HF_HUB_CACHE": str(olive_cache / "hf-hub"),
            "XDG_CACHE_HOME": str(olive_cache / "xdg"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    passes = ", ".join(f"{name} ({p.get('type')})" for name, p in step.olive_config["passes"].items())
    event("finetune" if finetune else "convert", f"olive run: {passes}")
    source_figures = None
    if (step.evaluate or {}).get("enabled", True):
        preload()  # torch and transformers imported for the evaluation while Olive runs in its own process
        if not finetune:
            # ... and the source's figures computed beside it, into the reference cache (not for a
            # finetune: its reference is the finetuned model, made by Olive's run).
            settings = Settings.from_json(step.evaluate)
            source_figures = prefetch_reference(model_dir, text_path=settings.text, text_source=settings.text_source,
                                                max_tokens=settings.max_tokens,
                                                trust_remote_code=step.model.trust_remote_code)
    started = time.monotonic()
    code, train_loss = _olive_run(config_path, env, watch_loss=bool(finetune))
    olive_seconds = time.monotonic() - started
    if code != 0:
        raise WorkerFailure("olive_failed", f"Olive failed: olive run exited with code {code}.")
    if not (output / "genai_config.json").is_file():
        # Olive exits 0 when a pass fails ("No output model produced").
        raise WorkerFailure(
            "olive_failed",
            "Olive failed: it finished without producing a model (it exits 0 when a pass fails).",
            "The end of the build log above shows the pass that failed.",
        )
    for name in OLIVE_BOOKKEEPING:
        if (output / name).exists():
            shutil.move(str(output / name), str(meta / name))

    quantized = quantize_output(step, output) if step.quantize else None
    tuned = finetune_outcome(finetune, output, meta, train_loss) if finetune else None
    adapters = {a["name"]: output / a["file"] for a in tuned["adapters"] if a.get("file")} if tuned else {}

    device = step.device
    event("check", "loading the model with onnxruntime-genai and generating tokens"
          + (f", with no adapter and with {', '.join(adapters)}" if adapters else ""))
    try:
        # Without the target's hardware: the same graph on the CPU, from a copy outside the model folder.
        report, checked = check_target(output, device, scratch=meta / "cpu-cross-check", adapters=adapters)
    except CheckError as e:
        raise WorkerFailure("check_failed", e.message, e.hint or "") from None
    how = "natively" if report.reason is None else f"by a CPU cross-check ({report.reason})"
    event("check", f"generated {len(report.generated_ids)} tokens from a {report.prompt_tokens}-token prompt, {how}")
    if source_figures is not None and source_figures.is_alive():
        event("evaluate", "waiting for the source model's figures, computed while Olive ran")
    if source_figures is not None:
        source_figures.join()
    if tuned is None:
        evaluation = evaluate_build(step, checked, model_dir, cross_check=report.reason)
    else:
        entry = tuned["adapters"][0]
        under_test = AdapterUnderTest(name=entry["name"], peft_dir=Path(tuned.pop("peft_dir")),
                                      onnx_adapter=adapters.get(entry["name"]))
        if under_test.onnx_adapter is None:
            # Merged: the artifact is the finetuned model, measured against the finetuned PyTorch model.
            evaluation = evaluate_build(step, checked, model_dir, cross_check=report.reason, adapter=under_test)
        else:
            # Each artifact carries its own figures: the base artifact (no adapter active) against the
            # source model, with the speed; the adapter against the finetuned PyTorch model.
            evaluation = evaluate_build(step, checked, model_dir, cross_check=report.reason)
            event("evaluate", f"the adapter {entry['name']!r}, active, against the finetuned PyTorch model")
            entry["evaluation"] = evaluate_build(step, checked, model_dir, cross_check=report.reason,
                                                 adapter=under_test, speed=False)
    out: dict[str, Any] = {
        "ok": True,
        "resolved_revision": resolved,
        "versions": tool_versions(),
        "check": report.to_json(),
        "olive_seconds": round(olive_seconds, 3),
        "evaluation": evaluation,
    }
    if tuned is not None:
        out["finetune"] = tuned
    if quantized is not None:
        out["quantization"] = quantized
    return out


def quantize_output(step: BuildStep, output: Path) -> dict[str, Any]:
    """Block-quantize the fp32 graph Olive's ModelBuilder wrote (``step.quantize``); what the
    build record keeps of it: the settings and what changed (deterministic, no times)."""
    from builder.build.quantize import Settings, quantize_folder  # lazy: numpy and onnx, only for builds that quantize

    try:
        settings = Settings.from_json(step.quantize)
    except ValueError as e:
        raise WorkerFailure("internal", f"The planned quantization is not valid: {e}") from None
    lm = f"int{settings.lm_head_bits}" if settings.lm_head_bits else "fp32"
    event("quantize", f"weights to {settings.bits} bits in blocks of {settings.block_size}, LM head {lm}, "
                      f"accuracy level {settings.accuracy_level}")
    try:
        summary = quantize_folder(output, settings)
    except (ValueError, OSError) as e:
        raise WorkerFailure("olive_failed", f"Quantizing the converted model failed: {e}") from None
    return {"settings": settings.to_json(), **summary}


_LOSS = re.compile(r"'train_loss': '?([0-9.eE+-]+)")


def _olive_run(config_path: Path, env: dict[str, str], *, watch_loss: bool) -> tuple[int, float | None]:
    """``olive run``, its output streamed as it comes; with ``watch_loss``, the final training
    loss the Hugging Face trainer prints (``{'train_runtime': ..., 'train_loss': ...}``)."""
    argv = [sys.executable, "-m", "olive", "run", "--config", str(config_path)]
    if not watch_loss:
        return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, check=False).returncode, None
    loss: float | None = None
    with subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None  # noqa: S101 - stdout=PIPE above
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace")
            sys.stdout.write(line)
            sys.stdout.flush()
            match = _LOSS.search(line)
            if match:
                try:
                    loss = float(match.group(1))
                except ValueError:
                    pass
        return proc.wait(), loss


def finetune_outcome(finetune: dict[str, Any], output: Path, meta: Path, train_loss: float | None) -> dict[str, Any]:
    """After a finetuning ``olive run``: put the adapter where the contract says, and describe
    it (dataset, settings, training time and loss) for the build record."""
    nodes: dict[str, Any] = {}
    try:
        footprint = json.loads((meta / "footprint.json").read_text(encoding="utf-8"))
        nodes = footprint if isinstance(footprint, dict) else {}
    except (OSError, ValueError):
        pass
    train = next((n for n in nodes.values() if isinstance(n, dict) and n.get("from_pass") in ("lora", "qlora")), None)
    if train is None:
        raise WorkerFailure("olive_failed", "Olive finished without a finetuning step in its footprint.",
                            "The build log above shows what the LoRA pass did.")
    peft_dir = ((train.get("model_config_data") or {}).get("config") or {}).get("adapter_path")
    if not peft_dir or not (Path(peft_dir) / "adapter_config.json").is_file():
        raise WorkerFailure("olive_failed", "Olive's LoRA pass left no PEFT adapter (adapter_config.json).")
    seconds = {k: max(0.0, float(n.get("end_time") or 0) - float(n.get("start_time") or 0))
               for k, n in nodes.items() if isinstance(n, dict) and n.get("from_pass")}
    training = {"seconds": round(seconds.get(train.get("model_id", ""), 0.0), 3),
                "conversion_seconds": round(sum(v for k, v in seconds.items() if k != train.get("model_id")), 3),
                "loss": train_loss}
    entry: dict[str, Any] = {
        "name": finetune["adapter"],
        "file": None,
        "dataset": {k: v for k, v in finetune["dataset"].items() if k not in ("files", "dir")},
        "settings": finetune["settings"],
        "training": training,
    }
    if finetune["mode"] == "adapter":
        produced = output / "adapter_weights.onnx_adapter"
        if not produced.is_file():
            raise WorkerFailure("olive_failed", "Olive's ExtractAdapters pass produced no adapter_weights.onnx_adapter.")
        dest = adapter_file(output, finetune["adapter"])
        dest.parent.mkdir(exist_ok=True)
        os.replace(produced, dest)
        entry.update(file=f"{ADAPTERS_DIR}/{dest.name}", sha256=sha256_file(dest), size=dest.stat().st_size)
    event("finetune", f"trained {finetune['settings'].get('max_steps')} steps in {training['seconds']:.1f} s"
          + (f", final loss {train_loss:.4f}" if train_loss is not None else ""))
    return {"mode": finetune["mode"], "method": finetune["method"], "adapters": [entry], "peft_dir": str(peft_dir)}


def evaluate_build(step: BuildStep, output: Path, source_dir: str, *, cross_check: str | None = None,
                   adapter: Any = None, speed: bool = True) -> dict[str, Any]:
    """The evaluation stage: the checked model against its source; a gate failure fails the build.

    With ``cross_check`` (why the target's hardware is missing) ``output`` is the CPU copy the
    check ran: accuracy is measured on the same graph, speed is not (CPU figures would not
    describe the target)."""
    settings = Settings.from_json(step.evaluate)
    wanted_speed = settings.speed
    if cross_check is not None or not speed:
        settings = dataclasses.replace(settings, speed=False)
    if not settings.enabled:
        event("evaluate", "not evaluated: `evaluate: false` in the recipe")
        return not_evaluated("turned off in the recipe (`evaluate: false`)")
    try:
        result = evaluate(
            output,
            source_dir,
            precision=step.precision,
            device=step.device,
            settings=settings,
            trust_remote_code=step.model.trust_remote_code,
            on_progress=lambda message: event("evaluate", message),
            **({"adapter": adapter} if adapter is not None else {}),
        )
        if cross_check is not None and wanted_speed:
            result.speed = {"measured": False, "reason": f"speed not measured: cpu-cross-check ({cross_check})"}
        elif not speed and wanted_speed:
            result.speed = {"measured": False, "reason": "speed is measured once per build, on the base model "
                                                         "(see the base artifact)"}
        raise_for_gates(result)
    except BuilderError as e:  # EvaluationError (a gate), CheckError (the model would not load)
        raise WorkerFailure("evaluation_failed", e.message, e.hint or "") from None
    except Exception as e:  # noqa: BLE001 - any failure (an architecture transformers cannot run) fails the build
        raise WorkerFailure(
            "evaluation_failed",
            f"The evaluation could not run: {type(e).__name__}: {e}",
            "`evaluate: false` in the recipe skips the stage (the artifact then says it was not evaluated).",
        ) from None
    acc = result.accuracy
    event("evaluate", f"perplexity ratio {acc.get('perplexity_ratio')}, top-1 agreement {acc.get('top1_agreement')}, "
          f"{result.seconds:.1f} s: within the gates")
    return result.to_json()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m builder.build.worker SPEC.json", file=sys.stderr)
        return 2
    try:
        spec = WorkerSpec.read(Path(args[0]))
    except (OSError, ValueError, RecordError) as e:
        print(f"[olive-builder] unreadable spec {args[0]}: {e}", file=sys.stderr)
        return 2
    result_path = Path(spec.work_dir) / "meta" / RESULT_FILE
    result_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = WorkerResult.from_json(run(spec))
    except WorkerFailure as e:
        result = WorkerResult(ok=False, kind=e.kind, message=e.message, hint=e.hint)
    except BuilderError as e:
        result = WorkerResult(ok=False, kind="internal", message=e.message, hint=e.hint or "")
    atomic_write(result_path, json.dumps(result.to_json(), indent=2))
    if not result.ok:
        print(f"[olive-builder] build failed: {result.message}", flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
