"""Lock files (``olive-builder.lock``): every Hub recipe's revision pinned to a commit, with
the sha256 of each file its build downloads.

``build lock`` writes one (``write``); ``build recipe`` uses the first found in the
recipe's folder or above (``find``, ``entry``), and ``--require-locked`` refuses a Hub
recipe that is neither pinned by a commit nor by an entry (``require``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.contract import LOCK_FILE, write_json
from builder.errors import PlanError
from builder.recipe import format as recipe
from builder.recipe.format import LoadedRecipe
from builder.source import hub


@dataclass(frozen=True)
class Entry:
    hub: str
    revision: str
    commit: str
    files: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"hub": self.hub, "revision": self.revision, "commit": self.commit, "files": dict(self.files)}


def find(start: Path) -> Path | None:
    for folder in [start, *start.parents]:
        if (folder / LOCK_FILE).is_file():
            return folder / LOCK_FILE
    return None


def read(path: Path) -> dict[str, Entry]:
    """The entries of a lock file, by recipe id."""
    bad = PlanError(f"{path} is not a lock file written by `build lock`.", hint="Delete it and run `build lock` again.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise bad from None
    recipes = data.get("recipes") if isinstance(data, dict) else None
    if not isinstance(recipes, dict):
        raise bad
    out: dict[str, Entry] = {}
    for rid, e in recipes.items():
        if not (isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("hub", "revision", "commit"))
                and isinstance(e.get("files", {}), dict) and hub.is_commit(e["commit"])):
            raise bad
        out[str(rid)] = Entry(e["hub"], e["revision"], e["commit"], {str(k): str(v) for k, v in e.get("files", {}).items()})
    return out


def entry(loaded: LoadedRecipe, lock: Path | None) -> Entry | None:
    """The lock's entry for this recipe, if it is current (same model and revision)."""
    if lock is None or not loaded.recipe.model.hub:
        return None
    found = read(lock).get(loaded.id)
    revision = loaded.recipe.model.revision or "main"
    if found and found.hub == loaded.recipe.model.hub and found.revision == revision:
        return found
    return None  # stale: the recipe names another model or revision than the lock recorded


def require(loaded: LoadedRecipe, found: Entry | None, lock: Path | None) -> None:
    m = loaded.recipe.model
    if not m.hub or hub.is_commit(m.revision) or found is not None:
        return
    where = f"{lock} has no current entry for it" if lock else f"no {LOCK_FILE} was found above {loaded.path.parent}"
    raise PlanError(
        f"{loaded.id} is not pinned: revision {m.revision or 'main'!r} of {m.hub} can move, and {where}.",
        hint="Run `build lock` and commit olive-builder.lock, or set model.revision to a commit; "
             "--require-locked refuses unpinned recipes.",
    )


def write(paths: list[Path], lock_file: Path) -> list[tuple[str, Entry]]:
    """Resolve every Hub recipe under ``paths`` and record it in ``lock_file`` (other entries are
    kept). Nothing is written unless every revision resolves. Returns (recipe id, entry) resolved now."""
    entries = read(lock_file) if lock_file.exists() else {}
    problems: list[str] = []
    resolved: list[tuple[str, Entry]] = []
    for path in recipe.discover(paths):
        loaded = recipe.load(path)
        m = loaded.recipe.model
        if not m.hub:
            continue
        revision = m.revision or "main"
        commit = hub.resolve(m.hub, revision)
        if commit is None:
            problems.append(f"{loaded.id}: {m.hub}@{revision} could not be resolved (no Hub access and not in the cache)")
            continue
        entries[loaded.id] = Entry(m.hub, revision, commit, hub.snapshot_files(m.hub, commit))
        resolved.append((loaded.id, entries[loaded.id]))
    if problems:
        raise PlanError("Some revisions could not be resolved; the lock file was not changed:\n  " + "\n  ".join(problems),
                        hint="Run where the Hugging Face Hub is reachable (HF_TOKEN for private models), "
                             "or with the models in the Hugging Face cache and HF_HUB_OFFLINE=1.")
    write_json(lock_file, {"version": 1, "recipes": {rid: e.to_json() for rid, e in sorted(entries.items())}})
    return resolved
