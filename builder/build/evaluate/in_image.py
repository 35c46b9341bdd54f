"""The evaluation inside a builder image, for hosts without torch, transformers and
onnxruntime-genai: ``python -m builder.build.evaluate --record-line`` runs there through the
engine, with the model, the source, the text and the adapter mounted read-only, and its record
comes back on one line of output (``report.RECORD_PREFIX``).
"""

from __future__ import annotations

import json
from pathlib import Path

from builder.build.engine import Engine, Job, LineSink, Mount
from builder.build.evaluate.gates import Settings
from builder.build.evaluate.report import RECORD_PREFIX, EvaluationRecord
from builder.build.measure import AdapterUnderTest
from builder.errors import EvaluationError


def evaluate_in_image(engine: Engine, image: str, model_dir: Path, source_dir: Path | None, *,
                      precision: str | None, device: str, settings: Settings, text_path: Path | None,
                      on_line: LineSink, adapter: AdapterUnderTest | None = None) -> EvaluationRecord:
    """The same evaluation inside a builder image (for hosts without torch, transformers and
    onnxruntime-genai): the folders are mounted read-only and the record comes back on one line."""
    mounts = [Mount(model_dir.resolve(), "/eval/model", read_only=True)]
    args = ["/eval/model", "--record-line", "--device", device, "--max-tokens", str(settings.max_tokens)]
    if source_dir is not None:
        mounts.append(Mount(source_dir.resolve(), "/eval/source", read_only=True))
        args += ["--against", "/eval/source"]
    if text_path is not None:
        mounts.append(Mount(text_path.resolve(), "/eval/text.txt", read_only=True))
        args += ["--text", "/eval/text.txt"]
    if precision:
        args += ["--precision", precision]
    if adapter is not None:
        args += ["--adapter", adapter.name]
        if adapter.onnx_adapter is None:
            args.append("--merged")
        else:
            # Under its own file name: the record names the file.
            inside = f"/eval/adapter/{adapter.onnx_adapter.name}"
            mounts.append(Mount(adapter.onnx_adapter.resolve(), inside, read_only=True))
            args += ["--adapter-file", inside]
        if adapter.peft_dir is not None and source_dir is not None:
            mounts.append(Mount(Path(adapter.peft_dir).resolve(), "/eval/peft", read_only=True))
            args += ["--peft", "/eval/peft"]
    if not settings.speed:
        args.append("--no-speed")
    found: list[str] = []

    def sink(line: str) -> None:
        if line.startswith(RECORD_PREFIX):
            found.append(line[len(RECORD_PREFIX):])
        else:
            on_line(line)

    env = {"HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/cache", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    # The CPU builder image: a cuda model is measured for accuracy on the CPU provider there,
    # and its record says why speed was not measured.
    code = engine.run(Job(image=image, module="builder.build.evaluate", args=tuple(args), env=env, mounts=tuple(mounts),
                          gpus=False), sink)
    if not found:
        raise EvaluationError(f"The evaluation in the builder image {image} stopped (exit code {code}) without "
                              "a result; its output is above.")
    data = json.loads(found[-1])
    known = {f for f in EvaluationRecord.__dataclass_fields__}
    return EvaluationRecord(**{k: v for k, v in data.items() if k in known})
