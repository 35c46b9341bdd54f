"""Builder and runtime images: where their Dockerfiles are, what their tags are, and building them.

A builder image's tag is derived from what goes into it (the Dockerfile, the build
arguments, the names and sizes of any local wheels), so a changed Dockerfile gets a new
tag and an unchanged one is never rebuilt. The driver package itself is mounted into
builder containers at run time, not installed, so changing olive-builder's code never
needs a new image.

Settings come from options or the environment:
    OLIVE_BUILDER_BASE_IMAGE          base image for builders and for runtime build stages
                                      (default: each Dockerfile's own)
    OLIVE_BUILDER_RUNTIME_BASE_IMAGE  base image runtime images run on (default: as above)
    OLIVE_BUILDER_WHEELS       a folder of wheels that pip inside the build may use
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from builder.contract import PACKAGE_DIR
from builder.errors import ImageError

# flavour -> Dockerfile, relative to the project root
FLAVOURS = {
    "cpu": "Dockerfile.cpu",
    "cuda": "Dockerfile.cuda",
    "runtime-cpu": "images/runtime-cpu/Dockerfile",
    "runtime-cuda": "images/runtime-cuda/Dockerfile",
}
# Files of this package that runtime images carry (the server, without the build side).
# What of olive-builder the runtime images carry: the server package and the stdlib-only modules it
# imports (tests/test_layout.py imports the server from exactly these files).
RUNTIME_FILES = ("builder/__init__.py", "builder/contract.py", "builder/errors.py",
                 *sorted(f"builder/serve/{p.name}" for p in (PACKAGE_DIR / "serve").glob("*.py")))
REPOSITORY = "olive-builder"
ENV_BASE_IMAGE = "OLIVE_BUILDER_BASE_IMAGE"
ENV_RUNTIME_BASE_IMAGE = "OLIVE_BUILDER_RUNTIME_BASE_IMAGE"
ENV_WHEELS = "OLIVE_BUILDER_WHEELS"


@dataclass(frozen=True)
class ImageSpec:
    flavour: str
    dockerfile: Path
    build_args: dict[str, str] = field(default_factory=dict)
    wheels: tuple[Path, ...] = ()
    files: tuple[tuple[Path, str], ...] = ()  # (source, path in the build context)

    @property
    def tag(self) -> str:
        h = hashlib.sha256()
        h.update(self.dockerfile.read_bytes())
        h.update(json.dumps(self.build_args, sort_keys=True).encode())
        for source, name in self.files:
            h.update(name.encode() + b"\0" + source.read_bytes())
        for wheel in self.wheels:
            h.update(f"{wheel.name}:{wheel.stat().st_size}".encode())
        return f"{REPOSITORY}-{self.flavour}:{h.hexdigest()[:12]}"


def project_root() -> Path:
    """The checkout holding the Dockerfiles (olive-builder is installed from it with pip -e)."""
    candidates = [PACKAGE_DIR.parent, Path.cwd()]
    for root in candidates:
        if (root / FLAVOURS["cpu"]).is_file():
            return root
    raise ImageError(
        "The builder Dockerfiles (Dockerfile.cpu, Dockerfile.cuda) were not found.",
        hint="Run from an olive-builder checkout (pip install -e .), or pass --image with a builder image.",
    )


def image_spec(flavour: str, *, base_image: str | None = None, wheels_dir: str | Path | None = None,
               runtime_base_image: str | None = None) -> ImageSpec:
    """What goes into one image. Runtime images build on ``base_image`` and run on
    ``runtime_base_image`` (default: the same); builder images use ``base_image``."""
    if flavour not in FLAVOURS:
        raise ImageError(f"Unknown image flavour {flavour!r}.", hint=f"Use one of: {', '.join(FLAVOURS)}.")
    base_image = base_image if base_image is not None else os.environ.get(ENV_BASE_IMAGE) or None
    if runtime_base_image is None:
        runtime_base_image = os.environ.get(ENV_RUNTIME_BASE_IMAGE) or None
    wheels_dir = wheels_dir if wheels_dir is not None else os.environ.get(ENV_WHEELS) or None
    args: dict[str, str] = {}
    files: tuple[tuple[Path, str], ...] = ()
    root = project_root()
    if flavour.startswith("runtime-"):
        if base_image:
            args["BUILD_BASE_IMAGE"] = base_image
        if runtime_base_image or base_image:
            args["BASE_IMAGE"] = str(runtime_base_image or base_image)
        files = tuple((root / name, name) for name in RUNTIME_FILES)
    elif base_image:
        args["BASE_IMAGE"] = base_image
    wheels: tuple[Path, ...] = ()
    if wheels_dir:
        folder = Path(wheels_dir)
        if not folder.is_dir():
            raise ImageError(f"The wheels folder {folder} does not exist.", hint=f"Fix --wheels or {ENV_WHEELS}.")
        wheels = tuple(sorted(folder.glob("*.whl")))
    return ImageSpec(flavour=flavour, dockerfile=root / FLAVOURS[flavour], build_args=args, wheels=wheels, files=files)


def build_image(client: object, spec: ImageSpec, on_line: Callable[[str], None]) -> str:
    """Build ``spec`` in the Docker engine behind ``client``; returns the image id."""
    import docker.errors

    tail: list[str] = []
    with tempfile.TemporaryDirectory(prefix="olive-builder-image-") as ctx:
        context = Path(ctx)
        shutil.copyfile(spec.dockerfile, context / "Dockerfile")
        (context / "wheels").mkdir()
        for source, name in spec.files:
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, context / name)
        for wheel in spec.wheels:
            target = context / "wheels" / wheel.name
            try:
                os.link(wheel, target)
            except OSError:
                shutil.copyfile(wheel, target)
        image_id = ""
        try:
            stream = client.api.build(  # type: ignore[attr-defined]
                path=str(context),
                dockerfile="Dockerfile",
                tag=spec.tag,
                buildargs=spec.build_args,
                rm=True,
                forcerm=True,
                decode=True,
                labels={"org.olive-builder.flavour": spec.flavour},
            )
            for chunk in stream:
                if "stream" in chunk:
                    for line in str(chunk["stream"]).splitlines():
                        if line.strip():
                            tail.append(line)
                            del tail[:-40]
                            on_line(line)
                if "aux" in chunk and isinstance(chunk["aux"], dict) and "ID" in chunk["aux"]:
                    image_id = chunk["aux"]["ID"]
                if "error" in chunk:
                    raise ImageError(
                        f"Building the {spec.flavour} image failed: {str(chunk['error']).strip()}",
                        hint="The end of the image build log is above.",
                        log_tail=tail,
                    )
        except docker.errors.APIError as e:
            raise ImageError(
                f"Building the {spec.flavour} image failed: {e.explanation or e}",
                hint="If the base image is missing, set --base-image (or OLIVE_BUILDER_BASE_IMAGE) to one you have.",
                log_tail=tail,
            ) from None
    return image_id or str(client.images.get(spec.tag).id)  # type: ignore[attr-defined]
