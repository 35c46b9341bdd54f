"""Training datasets for `finetune:` recipes: read, check against the text template, digest.

Stdlib only. A dataset is one or more local files (JSON Lines, a JSON array of objects, or
CSV with a header row), either named by the recipe or downloaded from a Hub dataset at a
pinned commit. Olive's LoRA pass turns each row into training text with
``template.format(**row)``; everything that would make that fail, or silently train on
something else (a missing column, a null, a row that is not an object), is found here,
before any container starts, with the file and line of the first bad row.
"""

from __future__ import annotations

import csv
import hashlib
import json
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv"}  # suffix -> datasets' loader name
MAX_LINE = 16 << 20  # one JSONL row or CSV field
MAX_JSON_ARRAY = 256 << 20  # a .json file is parsed whole
MAX_PROBLEMS = 5


class DatasetProblem(ValueError):
    """A dataset that cannot be trained on; the message names the file and line."""


@dataclass(frozen=True)
class DatasetInfo:
    files: tuple[str, ...]  # names, as the recipe gives them
    rows: int
    columns: tuple[str, ...]  # columns of the first row (every row has the template's fields)
    sha256: str  # one digest over every file's content, in order
    loader: str  # "json" or "csv": the `datasets` builder Olive loads them with

    def to_json(self) -> dict[str, object]:
        return {"files": list(self.files), "rows": self.rows, "columns": list(self.columns),
                "sha256": self.sha256, "format": self.loader}


def template_fields(template: str) -> list[str]:
    """The fields ``{name}`` a text template uses. Only plain names: no positional ``{}``,
    attribute or index access, conversions or format specs (``str.format`` would evaluate them
    on the row's values)."""
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise DatasetProblem(f"the template is not a valid text template: {e} (write a literal brace as {{{{ or }}}})")\
            from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise DatasetProblem(f"template field {{{name}}} is not a plain column name: use {{column}} only, "
                               "without '.', '[...]' or positional {}")
        if spec or conversion:
            raise DatasetProblem(f"template field {{{name}}} has a conversion or format spec; use {{{name}}} alone")
        if name not in fields:
            fields.append(name)
    if not fields:
        raise DatasetProblem("the template uses no dataset column: name at least one, e.g. {instruction}")
    return fields


def check(files: list[tuple[str, Path]], fields: list[str]) -> DatasetInfo:
    """Read every row of ``files`` ((shown name, path) pairs): each must be an object (a CSV
    row) holding every template field with a string or number value."""
    if not files:
        raise DatasetProblem("the dataset has no files")
    loaders = {FORMATS.get(Path(name).suffix.lower()) for name, _ in files}
    if None in loaders:
        bad = next(name for name, _ in files if Path(name).suffix.lower() not in FORMATS)
        raise DatasetProblem(f"{bad}: unsupported dataset file type; use .jsonl, .json or .csv")
    if len(loaders) != 1:
        raise DatasetProblem("the dataset mixes JSON and CSV files; use one format")
    loader = loaders.pop() or "json"
    digest = hashlib.sha256()
    rows, columns, problems = 0, None, []
    for name, path in files:
        if not path.is_file():
            raise DatasetProblem(f"{name}: not a regular file")
        with path.open("rb") as stream:
            while chunk := stream.read(4 << 20):
                digest.update(chunk)
        for line, row in _rows(name, path):
            rows += 1
            if columns is None:
                columns = tuple(row)
            for field in fields:
                if field not in row:
                    close = ", ".join(sorted(row)[:12]) or "none"
                    problems.append(f"{name}:{line}: column `{field}` of the template is missing "
                                    f"(this row has: {close})")
                    break
                value = row[field]
                if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                    what = "null" if value is None else type(value).__name__
                    problems.append(f"{name}:{line}: column `{field}` is {what}; the template needs text or a number")
                    break
            if len(problems) >= MAX_PROBLEMS:
                break
        if len(problems) >= MAX_PROBLEMS:
            break
    if problems:
        raise DatasetProblem("\n".join(problems))
    if rows == 0:
        raise DatasetProblem(f"{files[0][0]}: the dataset has no rows")
    return DatasetInfo(tuple(name for name, _ in files), rows, columns or (), "sha256:" + digest.hexdigest(), loader)


def _rows(name: str, path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    suffix = Path(name).suffix.lower()
    if suffix == ".json":
        size = path.stat().st_size
        if size > MAX_JSON_ARRAY:
            raise DatasetProblem(f"{name}: {size >> 20} MiB is too large for a .json array; use JSON Lines (.jsonl)")
        raw = path.read_bytes()
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise DatasetProblem(f"{name}: not valid UTF-8 JSON: {e}") from None
        if not isinstance(data, list):
            raise DatasetProblem(f"{name}: a .json dataset must be an array of objects (or use JSON Lines)")
        for i, row in enumerate(data, 1):
            if not isinstance(row, dict):
                raise DatasetProblem(f"{name}: item {i} is a {type(row).__name__}, not an object")
            yield i, row
        return
    if suffix == ".csv":
        csv.field_size_limit(MAX_LINE)
        with path.open("r", encoding="utf-8-sig", newline="") as text:
            reader = csv.DictReader(text)
            try:
                if not reader.fieldnames:
                    raise DatasetProblem(f"{name}: a CSV dataset needs a header row naming its columns")
                for row in reader:
                    if None in row:  # more values than header columns
                        raise DatasetProblem(f"{name}:{reader.line_num}: more values than the header has columns")
                    yield reader.line_num, {k: v for k, v in row.items() if v is not None}
            except csv.Error as e:
                raise DatasetProblem(f"{name}:{reader.line_num}: not valid CSV: {e}") from None
            except UnicodeDecodeError as e:
                raise DatasetProblem(f"{name}:{reader.line_num + 1}: not UTF-8: {e}") from None
        return
    with path.open("rb") as f:
        for number, line in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), 1):
            if len(line) > MAX_LINE:
                raise DatasetProblem(f"{name}:{number}: a line longer than {MAX_LINE >> 20} MiB")
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise DatasetProblem(f"{name}:{number}: not a JSON object: {e}") from None
            if not isinstance(row, dict):
                raise DatasetProblem(f"{name}:{number}: a {type(row).__name__}, not a JSON object")
            yield number, row

