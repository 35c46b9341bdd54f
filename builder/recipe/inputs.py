"""What a build takes from the recipe's surroundings, resolved once by the pipeline before the
build: the recipe's text and its path within its git repository, its lock entry, and the
creation time that manifests record (from the inputs only, never the clock). Packaging and
attestation receive these (``contract.RecipeInputs``); they never read the recipe, the lock
file or git themselves.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

from builder.contract import RecipeInputs, reproducible_time
from builder.errors import BuilderError
from builder.recipe import format as recipe
from builder.recipe import lock


def resolve(loaded: recipe.LoadedRecipe, entry: lock.Entry | None) -> RecipeInputs:
    """The recipe's inputs for the provenance; what cannot be read is left out."""
    shown = shown_path(loaded.path)
    try:
        text: str | None = loaded.path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = None
    return RecipeInputs(path=shown, text=text, lock_entry=entry.to_json() if entry is not None else None)


def shown_path(path: Path) -> str:
    """The recipe's path within its git repository (as a workflow names it), else its file name:
    the provenance does not publish where a build machine keeps its files."""
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path.resolve().parent,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return path.resolve().relative_to(Path(out.stdout.strip()).resolve()).as_posix()
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return path.name


def created_time(recipe_path: Path | None = None, model_dir: Path | None = None, *,
                 source_dir: Path | None = None, source_time: dt.datetime | None = None,
                 recorded: str | None = None) -> dt.datetime:
    """The creation time recorded in manifests, from the build's inputs only, so the same inputs
    give the same digests with no settings: ``SOURCE_DATE_EPOCH`` if set, else the newest of
    the recipe's last git commit, the source model's commit time (``source_time``, for Hub
    models) and the newest file of a local source model (``source_dir``, else the recipe's
    ``model.path``); 1970-01-01 when none is known. Never the clock and never the output:
    ``model_dir`` (what was built) is not looked at, since its files are as new as the build.
    ``recorded``: the time the build record holds (computed from the inputs at build time),
    used when no SOURCE_DATE_EPOCH overrides it, so a folder packaged again keeps its digests."""
    del model_dir  # kept for callers: the output folder's times are the build's, not the inputs'
    if os.environ.get("SOURCE_DATE_EPOCH") or recorded:
        return reproducible_time(recorded)
    times: list[float] = []
    if source_time is not None:
        times.append(source_time.timestamp())
    if recipe_path is not None:
        try:
            out = subprocess.run(["git", "log", "-1", "--format=%ct", "--", recipe_path.name], cwd=recipe_path.parent,
                                 capture_output=True, text=True, timeout=10, check=False)
            if out.returncode == 0 and out.stdout.strip():
                times.append(float(int(out.stdout.strip())))
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
        if source_dir is None:
            source_dir = _local_source(recipe_path)
    if source_dir is not None:
        try:
            times.append(max((p.stat().st_mtime for p in Path(source_dir).rglob("*") if p.is_file()), default=0.0))
        except OSError:
            pass
    return dt.datetime.fromtimestamp(int(max(times, default=0.0)), dt.UTC)


def _local_source(recipe_path: Path) -> Path | None:
    """The local model folder a recipe names (``model.path``), if it names one and still loads."""
    try:
        return recipe.load(recipe_path).model_dir
    except BuilderError:  # a recipe that no longer loads just adds no time
        return None
