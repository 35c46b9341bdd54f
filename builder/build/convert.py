"""Turning a fetched GGUF file into a Hugging Face folder, once per digest, in the builder.

The driver fetches and verifies the file (``builder.source.gguf.fetch``) into
``CACHE/gguf/<sha256>/``; this job runs ``python -m builder.source.gguf convert`` where
torch, transformers and gguf are (the builder image, or this host with the local engine) and
leaves ``CACHE/gguf/<sha256>/hf/``: float32 weights dequantized from the GGUF, its tokenizer
and chat template, and ``gguf-source.json`` naming the GGUF. Later builds of any precision
or target of the same file reuse that folder. The conversion writes beside the folder and
renames, so a failed or interrupted one leaves nothing that looks converted.
"""

from __future__ import annotations

import collections
from pathlib import Path

from builder.build.engine import Engine, Job, Mount
from builder.build.execute import LOG_TAIL_LINES
from builder.errors import BuildError
from builder.reporting import Reporter
from builder.source.gguf import SOURCE_NOTE

CONVERTED = "hf"  # the converted folder, beside the GGUF file in its digest's cache folder


def converted_folder(gguf_file: Path) -> Path:
    return gguf_file.parent / CONVERTED


def is_converted(folder: Path) -> bool:
    return (folder / SOURCE_NOTE).is_file() and (folder / "config.json").is_file()


def convert_gguf(gguf_file: Path, engine: Engine, image: str, *, reporter: Reporter | None = None) -> Path:
    """The converted folder for ``gguf_file`` (a verified file in the GGUF cache): converted
    now unless an earlier build did it."""
    out = converted_folder(gguf_file)
    if is_converted(out):
        return out
    mount = Mount(gguf_file.parent, "/gguf", read_only=False)
    root = engine.path_for(mount)
    env = {
        # Everything the conversion needs is in the file: nothing may reach the Hub.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONUNBUFFERED": "1",
    }
    job = Job(image=image, module="builder.source.gguf",
              args=("convert", f"{root}/{gguf_file.name}", f"{root}/{CONVERTED}"),
              env=env, mounts=(mount,))
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)

    def sink(line: str) -> None:
        tail.append(line)
        if reporter is not None:
            reporter.log(line)

    code = engine.run(job, sink)
    if is_converted(out):  # ours, or a concurrent build's that renamed first
        return out
    raise BuildError(
        f"Converting {gguf_file.name} into a Hugging Face folder failed (exit code {code}).",
        hint="The end of the conversion log is above. The GGUF file itself was verified; a model the "
             "builder's transformers cannot read needs a newer builder image.",
        log_tail=list(tail),
    )
