"""Hostile and unlucky recipe files: every one is a usage error (exit 2) naming file:line, with
no traceback, in well under a second and a few tens of MB, and nothing is written.

The cases run in one child process (``_probe``) so that its peak memory is measured on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from builder.errors import RecipeError
from builder.recipe import format as recipe

BASE = "name: tiny\nversion: 1.0.0\nmodel:\n  hub: a/b\ntarget:\n  device: cpu\n  precision: int4\n"


def _laughs() -> str:
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev, cur = chr(96 + i), chr(97 + i)
        levels.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 10) + "]")
    return BASE + "olive:\n  passes:\n" + "".join(f"    {line}\n" for line in levels)


def _merge_bomb() -> str:
    lines = ["x0: &x0 {a: 1, b: 2}"] + [f"x{i + 1}: &x{i + 1}\n  <<: [" + ", ".join([f"*x{i}"] * 9) + "]"
                                      for i in range(9)]
    return BASE + "\n".join(lines) + "\n"


# name -> (file content or a maker, text the message must contain)
CASES: dict[str, tuple[str, str]] = {
    "billion-laughs": (_laughs(), "expands to more than 10000 YAML nodes"),
    "merge-bomb": (_merge_bomb(), ""),  # refused (unknown keys) or by the budget: either way fast and small
    "20-mb": (BASE + "description: " + "x" * (20 << 20) + "\n", "a recipe may be at most 262144 bytes"),
    "deep-lists": (BASE + "olive: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested more than 32 levels deep"),
    "deep-maps": (BASE + "olive: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n", "nested more than 32 levels deep"),
    "alias-cycle": (BASE + "olive: &a [*a]\n", "levels deep (through aliases)"),
    "many-nodes": (BASE + "olive: [" + "1," * 120_000 + "1]\n", "more than 10000 YAML nodes"),
    "many-aliases": (BASE + "a: &a 1\nb: [" + ", ".join(["*a"] * 200) + "]\n", "more than 100 aliases"),
    "list-key": (BASE + "? [a, b]\n: 1\n", ":8: a list is used as a key"),
    "map-key": (BASE + "{a: 1}: 2\n", ":8: a mapping is used as a key"),
    "huge-int": (BASE + "generation:\n  max_length: " + "9" * 10_000 + "\n", ":9: cannot read this value"),
    "not-utf8": ("", ":8: cannot be read as a recipe: not UTF-8 text"),  # written as bytes below
    "nul-byte": (BASE + "description: a\0b\n", ":8: not valid YAML"),
    "python-tag": (BASE + "description: !!python/object/apply:os.system ['true']\n", ":8: description:"),  # never run
    "version-too-long": (BASE.replace("1.0.0", "v" * 102), "is not allowed here"),
    "version-plus": (BASE.replace("1.0.0", "1.0+build"), "'1.0+build' is not allowed here"),
    "version-dollar": (BASE.replace("1.0.0", '"$(id)"'), "'$(id)' is not allowed here"),
    "name-upper": (BASE.replace("name: tiny", "name: Tiny:latest"), "as an OCI repository name"),
    "name-slash": (BASE.replace("name: tiny", "name: ../etc"), "as an OCI repository name"),
    "model-path-proc": (BASE.replace("  hub: a/b", "  path: /proc/self/fd"), "kernel pseudo-filesystem"),
}
# File names are the target id: these must be refused with the OCI rule.
BAD_FILE_NAMES = {"colon": "cpu:int4", "at": "cpu@int4", "space": "cpu int4", "dollar": "$(touch pwned)",
                  "too-long": "t" * 140, "dot-first": ".hidden"}


def _write_cases(folder: Path) -> dict[str, tuple[Path, str]]:
    folder.mkdir(parents=True)
    out: dict[str, tuple[Path, str]] = {}
    for name, (text, expect) in CASES.items():
        path = folder / f"{name}.yaml"
        if name == "not-utf8":
            path.write_bytes((BASE + "description: caf\xe9\n").encode("latin-1"))
        else:
            path.write_text(text)
        out[name] = (path, expect)
    fifo = folder / "fifo.yaml"
    os.mkfifo(fifo)
    out["fifo"] = (fifo, "it is a named pipe (FIFO), not a regular file")
    zero = folder / "zero.yaml"
    zero.symlink_to("/dev/zero")
    out["dev-zero-link"] = (zero, "it is a device, not a regular file")
    for label, stem in BAD_FILE_NAMES.items():
        path = folder / f"{stem}.yaml"
        path.write_text(BASE)
        rule = "an OCI tag has at most 128" if label == "too-long" else "cannot be part of an OCI tag"
        out[f"file-name-{label}"] = (path, rule)
    return out


_PROBE = textwrap.dedent("""
    import json, resource, sys, time
    from builder.cli import main
    results = {}
    for name, path in json.loads(sys.argv[1]).items():
        start = time.monotonic()
        try:
            main(["recipe", path, "--dry-run"])
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        results[name] = {"code": code, "seconds": time.monotonic() - start,
                         "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
        print("@@" + name, file=sys.stderr, flush=True)
    print(json.dumps(results))
""")


def test_hostile_recipes_are_refused_fast_small_and_clean(tmp_path: Path) -> None:
    cases = _write_cases(tmp_path / "recipes" / "m")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    baseline = subprocess.run([sys.executable, "-c", "import resource; from builder.cli import main; "
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                              capture_output=True, text=True, check=True, timeout=60)
    start_kb = int(baseline.stdout)
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps({k: str(p) for k, (p, _) in cases.items()})],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    sections = proc.stderr.split("@@")
    messages = {}
    for i, name in enumerate(results):
        messages[name] = sections[i]  # what was printed before that case's marker
    worst = max(results.values(), key=lambda r: r["seconds"])
    print(f"worst: {worst['seconds']:.2f} s; peak {max(r['peak_kb'] for r in results.values()) / 1024:.0f} MB "
          f"(interpreter with the CLI imported: {start_kb / 1024:.0f} MB)")
    for name, (path, expect) in cases.items():
        r, err = results[name], messages[name]
        assert r["code"] == 2, f"{name}: exit {r['code']}\n{err}"
        assert "Traceback" not in err, f"{name}:\n{err}"
        assert f"{path.name}:" in err, f"{name}: no file:line in\n{err}"
        assert expect in err, f"{name}: {expect!r} not in\n{err}"
        assert r["seconds"] < 1.0, f"{name} took {r['seconds']:.2f} s"
    # the peak over all cases, above what importing the CLI costs
    assert max(r["peak_kb"] for r in results.values()) - start_kb < 200 * 1024
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, nothing left


def test_limits_leave_real_recipes_alone(tmp_path: Path) -> None:
    path = tmp_path / "m" / "cpu-int4.yaml"
    path.parent.mkdir()
    passes = "".join(f"    p{i}:\n      type: OnnxDynamicQuantization\n      precision: int8\n" for i in range(200))
    path.write_text(BASE.replace("int4", "int8") + "olive:\n  passes:\n" + passes)
    loaded = recipe.load(path)
    assert loaded.tag == "tiny:1.0.0-cpu-int4" and len(loaded.recipe.olive.passes) == 200  # type: ignore[union-attr]


def test_every_composed_tag_is_checked(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    ok = folder / ("t" * 100 + ".yaml")  # 1.0.0-<100>-serve = 112 characters: fine
    ok.write_text(BASE)
    assert recipe.load(ok).tag.endswith("t" * 100)
    bad = folder / ("t" * 118 + ".yaml")  # 1.0.0-<118>-serve = 130 characters
    bad.write_text(BASE)
    with pytest.raises(RecipeError) as info:
        recipe.load(bad)
    assert "130 characters; an OCI tag has at most 128" in str(info.value)
