"""The GitHub Actions matrix: one entry per recipe (= one model and target), with its runner.

With ``changed_since``, an entry is kept only if something that decides its build changed
since that git revision:

- the recipe file, in a way that matters (its cache inputs or its version; a comment or
  a description alone does not count),
- its entry in the lock file,
- a file of its local model folder (for `model.path` recipes inside the repository),
- the builder Dockerfile of its device, the runtime Dockerfile of its device, or
  olive-builder's version (``builder/__init__.py``).

Everything else is left out. A build that still turns out to have been built already is
skipped by the cache at build time; the matrix only avoids starting jobs for nothing.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from builder.errors import PlanError, RecipeError
from builder.publish import cache
from builder.recipe import format as recipe
from builder.recipe import lock
from builder.targets import DEVICES


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise PlanError("--changed-since needs git, which is not installed.") from None


def _changed(ref: str, cwd: Path) -> tuple[Path, set[str]]:
    top = _git(["rev-parse", "--show-toplevel"], cwd)
    if top.returncode != 0:
        raise PlanError(f"--changed-since needs a git checkout; {cwd} is not in one.")
    root = Path(top.stdout.strip())
    if _git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], root).returncode != 0:
        raise PlanError(f"{ref!r} is not a commit of this repository.",
                        hint="In GitHub Actions, check out with `fetch-depth: 0` so earlier commits are there.")
    diff = _git(["diff", "--name-only", ref, "--"], root)
    new = _git(["ls-files", "--others", "--exclude-standard"], root)
    if diff.returncode != 0:
        raise PlanError(f"git diff against {ref} failed: {diff.stderr.strip()}")
    return root, {line for line in (diff.stdout + new.stdout).splitlines() if line.strip()}


def _old(ref: str, root: Path, rel: str) -> str | None:
    shown = _git(["show", f"{ref}:{rel}"], root)
    return shown.stdout if shown.returncode == 0 else None


def _recipe_changed(loaded: recipe.LoadedRecipe, ref: str, root: Path, rel: str) -> bool:
    old_text = _old(ref, root, rel)
    if old_text is None:
        return True  # a new recipe
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / loaded.path.parent.name / loaded.path.name
        path.parent.mkdir()
        path.write_text(old_text)
        try:
            old = recipe.load(path)
        except RecipeError:
            return True  # it was broken before: build it now
    return (cache.recipe_inputs(old), old.recipe.version) != (cache.recipe_inputs(loaded), loaded.recipe.version)


def _lock_changed(loaded: recipe.LoadedRecipe, ref: str, root: Path, changed: set[str]) -> bool:
    lock_path = lock.find(loaded.path.parent.resolve())
    if lock_path is None:
        return False
    resolved = lock_path.resolve()
    rel = resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else None
    if rel is None or rel not in changed:
        return False
    before = _old(ref, root, rel)
    try:
        old_entry = json.loads(before)["recipes"].get(loaded.id) if before else None
    except (ValueError, KeyError, AttributeError):
        old_entry = None
    now = lock.read(lock_path).get(loaded.id)
    return old_entry != (now.to_json() if now else None)


def entries(paths: list[Path], *, device: str | None, runners: dict[str, list[str]],
            changed_since: str | None = None) -> list[dict[str, Any]]:
    loaded_all, problems = recipe.load_many(paths)
    if problems:
        raise recipe.invalid(problems)
    seen: dict[str, Path] = {}
    for loaded in loaded_all:
        if loaded.id in seen:
            raise RecipeError(f"Two recipes have the id {loaded.id}: {seen[loaded.id]} and {loaded.path}.",
                              hint="Ids are <folder>/<file name>; rename one of them.")
        seen[loaded.id] = loaded.path
    if device:
        loaded_all = [x for x in loaded_all if x.recipe.target.device == device]
    if changed_since:
        root, changed = _changed(changed_since, Path.cwd())
        kept = []
        for loaded in loaded_all:
            dev = loaded.recipe.target.device
            inputs = {f"Dockerfile.{DEVICES[dev].builder_flavour}", "builder/__init__.py"}
            if (runtime := DEVICES[dev].runtime_flavour) is not None:
                inputs.add(f"images/{runtime}/Dockerfile")
            if inputs & changed:
                kept.append(loaded)
                continue
            path = loaded.path.resolve()
            rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else None
            if rel in changed and _recipe_changed(loaded, changed_since, root, rel):
                kept.append(loaded)
                continue
            if _lock_changed(loaded, changed_since, root, changed):
                kept.append(loaded)
                continue
            model_dir = loaded.model_dir.resolve() if loaded.model_dir else None
            if model_dir is not None and model_dir.is_relative_to(root):
                prefix = model_dir.relative_to(root).as_posix() + "/"
                if any(c.startswith(prefix) for c in changed):
                    kept.append(loaded)
        loaded_all = kept
    out = []
    for loaded in sorted(loaded_all, key=lambda x: x.id):
        r = loaded.recipe
        try:
            shown = loaded.path.resolve().relative_to(Path.cwd().resolve()).as_posix()
        except ValueError:
            shown = str(loaded.path)
        out.append({
            "id": loaded.id,
            "recipe": shown,
            "target": loaded.target_name,
            "device": r.target.device,
            "precision": r.target.precision,
            "tag": loaded.tag,
            "runner": runners[r.target.device],
        })
    return out
