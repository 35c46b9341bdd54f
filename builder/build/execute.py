"""Execute one BuildStep on an engine and deliver a checked model folder, atomically.

The build happens in a hidden work folder beside the output (same filesystem, so the
final rename is atomic). The output folder appears only once the worker has checked the
model; a failure or Ctrl-C removes the work folder and leaves no output behind. The full
log goes to a log file; a failure carries its last lines.

The folder's build record holds what was built (a rebuild writes the same bytes); what the run
observed (speed, seconds, the CPU) goes beside the folder (``builder.build.observed``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.build import observed as observations
from builder.build.check import check_files
from builder.build.engine import Engine, Job, Mount
from builder.contract import (
    EVENT_PREFIX,
    RESULT_FILE,
    SPEC_FILE,
    BuilderInfo,
    BuildRecord,
    BuildStep,
    RecordError,
    Source,
    Target,
    WorkerResult,
    WorkerSpec,
    cache_dir,
    hf_home,
    hf_token,
    log_dir,
)
from builder.errors import BuildError, CheckError, EngineError, EvaluationError, ModelNotFoundError, OutputExistsError
from builder.oci.layout import rename_noreplace
from builder.reporting import NullReporter, Reporter

LOG_TAIL_LINES = 40
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)(: |$)")
HF_PASSTHROUGH = ("HF_HUB_OFFLINE", "HF_ENDPOINT")


@dataclass(frozen=True)
class BuildResult:
    output: Path
    record: BuildRecord
    seconds: float
    log_path: Path
    # What the run observed (builder.build.observed), kept beside ``output``, not in ``record``.
    observed: dict[str, Any] = field(default_factory=dict)


StageSink = Callable[[str, str], None]
LineSink = Callable[[str], None]


def default_output(build_id: str) -> Path:
    """Where a build writes its folder unless told: ``out/<model>/<target>``."""
    return Path("out") / build_id


def preflight_output(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise OutputExistsError(
            f"The output folder {output} already exists.",
            hint="Pass --force to replace it once the new build has passed its check, or choose --output.",
        )
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"{output} exists and is not a folder.", hint="Choose another --output.")


def preflight_model(step: BuildStep) -> None:
    """A local model folder that is missing fails here, before any engine starts."""
    if step.model.path is None:
        return
    folder = Path(step.model.path)
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"The model folder {folder} does not exist.",
            hint=f"Fix `model.path` in {step.recipe} (relative paths start at the recipe file's folder).",
        )
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"The model folder {folder} has no config.json, so it is not a Hugging Face model folder.",
            hint="Point `model.path` at a folder saved with save_pretrained (config.json, weights, tokenizer).",
        )


def execute(
    step: BuildStep,
    engine: Engine,
    output: Path,
    *,
    force: bool = False,
    reporter: Reporter | None = None,
    image_id: str | None = None,
    created: str | None = None,
) -> BuildResult:
    reporter = reporter or NullReporter()
    output = output.absolute()
    preflight_output(output, force)
    preflight_model(step)
    engine.preflight()
    output.parent.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    logs = log_dir()
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{step.id.replace('/', '__')}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    cause: str | None = None  # the last exception line seen: usually the reason a build failed
    token = hf_token()
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    secrets = Path(tempfile.mkdtemp(prefix="olive-builder-secret-")) if token else None
    try:
        job, spec = _job(step, engine, work, secrets, token)
        spec.write(work / SPEC_FILE)
        reporter.stage("start", f"{step.id}: {engine.name} engine" + (f", image {step.builder_image}" if engine.name == "docker" else ""))
        with log_path.open("w", encoding="utf-8") as log:

            def sink(line: str) -> None:
                nonlocal cause
                if token:
                    line = line.replace(token, "***")
                log.write(line + "\n")
                log.flush()
                if line.startswith(EVENT_PREFIX):
                    try:
                        ev = json.loads(line[len(EVENT_PREFIX) :])
                        reporter.stage(str(ev.get("stage", "")), str(ev.get("message", "")))
                        return
                    except ValueError:
                        pass
                tail.append(line)
                if _EXCEPTION_LINE.match(line):
                    cause = line.strip()
                reporter.log(line)

            code = engine.run(job, sink)
        result = _read_result(work)
        if result is None:
            raise BuildError(
                f"The builder stopped (exit code {code}) before reporting a result.",
                hint=f"The full log is in {log_path}.",
                log_tail=list(tail),
            )
        if not result.ok:
            raise _failure(result, log_path, list(tail), cause)
        model = work / "model"
        try:
            check_files(model)  # the worker checked it; make sure it all arrived on this side too
        except CheckError as e:
            e.log_tail = list(tail)
            raise
        record = dataclasses.replace(_record(step, result, engine.name, image_id), created=created)
        record.write(model)
        _replace(model, output, work, force)
        # Only once the folder is in place: a build that lost the race must not touch the winner's.
        seen = observations.write(output, _observed(result))
        reporter.stage("done", f"{output}")
        return BuildResult(output=output, record=record, seconds=time.monotonic() - started, log_path=log_path,
                           observed=seen)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if secrets is not None:
            shutil.rmtree(secrets, ignore_errors=True)


def _job(step: BuildStep, engine: Engine, work: Path, secrets: Path | None, token: str | None) -> tuple[Job, WorkerSpec]:
    work_mount = Mount(work, "/work", read_only=False)
    mounts = [work_mount]
    env = {"HOME": "/tmp", "PYTHONUNBUFFERED": "1"} if engine.name == "docker" else {}
    work_dir, model_dir = engine.path_for(work_mount), None
    if step.model.path is not None:
        model_mount = Mount(Path(step.model.path), "/model", read_only=True)
        mounts.append(model_mount)
        model_dir = engine.path_for(model_mount)
    elif engine.name == "docker":
        # The user's Hugging Face cache, so a model is downloaded once for every build and engine.
        cache = hf_home()
        cache.mkdir(parents=True, exist_ok=True)
        mounts.append(Mount(cache, "/hf-cache", read_only=False))
        env["HF_HOME"] = "/hf-cache"
        # Offline builds from the cache, and Hub mirrors, work as they do on the host.
        env.update({name: os.environ[name] for name in HF_PASSTHROUGH if os.environ.get(name)})
    if token and secrets is not None and engine.name == "docker":
        # A file mount, not an environment variable: `docker inspect` shows environments.
        token_file = secrets / "hf_token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        mounts.append(Mount(token_file, "/run/secrets/hf_token", read_only=True))
        env["HF_TOKEN_PATH"] = "/run/secrets/hf_token"
    if (step.evaluate or {}).get("enabled", True) and os.environ.get("OLIVE_BUILDER_EVAL_CACHE", "") != "off":
        # The evaluation's cache of source-model figures outlives the container, so a second
        # precision or target of the same source skips the source pass (builder.build.source_figures).
        figures = Path(os.environ.get("OLIVE_BUILDER_EVAL_CACHE") or cache_dir() / "eval-reference")
        figures.mkdir(parents=True, exist_ok=True)
        figures_mount = Mount(figures, "/eval-cache", read_only=False)
        mounts.append(figures_mount)
        env["OLIVE_BUILDER_EVAL_CACHE"] = engine.path_for(figures_mount)
    # The step as the worker sees it: the same plan, with the paths where its files are mounted.
    seen_step = step
    text = (step.evaluate or {}).get("text")
    if text:
        # The recipe's own evaluation text, read-only where the worker can see it.
        text_mount = Mount(Path(text), "/eval/text.txt", read_only=True)
        mounts.append(text_mount)
        seen_step = dataclasses.replace(seen_step, evaluate={**(step.evaluate or {}), "text": engine.path_for(text_mount)})
    if step.finetune:
        # The training data, read-only, as DATA_DIR/<i><suffix> (the names the planned config uses).
        dataset = dict(step.finetune["dataset"])
        seen = []
        for i, host in enumerate(dataset.get("files") or []):
            mount = Mount(Path(host), f"/data/{i}{Path(host).suffix.lower()}", read_only=True)
            mounts.append(mount)
            seen.append(engine.path_for(mount))
        dataset["files"] = seen
        dataset["dir"] = str(Path(seen[0]).parent) if seen else None
        seen_step = dataclasses.replace(seen_step, finetune={**step.finetune, "dataset": dataset})
    spec = WorkerSpec(step=seen_step, work_dir=work_dir, model_dir=model_dir)
    spec_mount_path = f"{work_dir}/{SPEC_FILE}"
    job = Job(
        image=step.builder_image,
        module="builder.build.worker",
        args=(spec_mount_path,),
        env=env,
        mounts=tuple(mounts),
        gpus=step.gpus,
    )
    return job, spec


def _read_result(work: Path) -> WorkerResult | None:
    path = work / "meta" / RESULT_FILE
    try:
        return WorkerResult.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, RecordError):
        return None


def _failure(result: WorkerResult, log_path: Path, tail: list[str], cause: str | None) -> Exception:
    kind, message, hint = result.kind, result.message or "the build failed", result.hint
    if cause and kind == "olive_failed":
        message = f"{message}\nCause: {cause}"
    hint = (hint + "\n" if hint else "") + f"The full log is in {log_path}."
    if kind == "model_not_found":
        return ModelNotFoundError(message, hint=hint, log_tail=tail)
    if kind == "check_failed":
        return CheckError(message, hint=hint, log_tail=tail)
    if kind == "evaluation_failed":
        return EvaluationError(message, hint=hint, log_tail=tail)
    if kind == "internal":
        return EngineError(message, hint=hint, log_tail=tail)
    return BuildError(message, hint=hint, log_tail=tail)


def _record(step: BuildStep, result: WorkerResult, engine: str, image_id: str | None) -> BuildRecord:
    """What was built from what, by what: recorded in the model folder for packaging and people.
    Nothing one run observed (times, speed, the machine, cache state; ``_observed``) goes in: the
    record is packaged, and a rebuild of the same inputs must give the same bytes."""
    sections, _ = observations.split(result.extra)
    return BuildRecord(
        id=step.id,
        name=step.name,
        version=step.version,
        tags=tuple(step.tags),
        description=step.description,
        license=step.license,
        target=Target(device=step.device, execution_provider=step.execution_provider, precision=step.precision),
        source=Source(hub=step.model.hub, revision=step.model.revision, resolved_revision=result.resolved_revision,
                      local=step.model.path is not None and step.model.gguf is None,
                      trust_remote_code=step.model.trust_remote_code, gguf=step.model.gguf),
        recipe_digest=step.recipe_digest,
        cache_key=step.cache_key,
        builder=BuilderInfo(version=step.builder_version, engine=engine,
                            image=step.builder_image if engine == "docker" else None, image_id=image_id),
        tools=dict(result.versions),
        check=dict(result.check),
        # Results of later stages (the evaluation, ...) travel as extra sections of the worker result.
        extra=sections,
    )


def _observed(result: WorkerResult) -> dict[str, Any]:
    """What the run observed: the parts of the worker's result that ``_record`` leaves out."""
    _, seen = observations.split({**result.extra, "olive_seconds": result.olive_seconds})
    return seen


def _replace(model: Path, output: Path, work: Path, force: bool) -> None:
    """Put the checked model at ``output``; with ``force`` an existing folder is swapped out only
    now. Without it, a folder that appeared while we built (another build to the same place)
    wins: the rename refuses to replace anything, so of two racing builds exactly one lands."""
    if force and output.exists():
        old = work / "previous-output"
        os.replace(output, old)
        try:
            os.replace(model, output)
        except OSError:
            os.replace(old, output)
            raise
        return
    try:
        rename_noreplace(model, output)
    except FileExistsError:
        raise OutputExistsError(
            f"The output folder {output} appeared meanwhile (another build wrote it); this build was not put "
            "in its place.",
            hint="Pass --force to replace it once the new build has passed its check, or choose --output.",
        ) from None
