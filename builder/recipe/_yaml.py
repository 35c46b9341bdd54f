"""YAML loading that remembers where every key came from, so errors can say file:line.

Recipes come from anywhere (a pull request, a download), so loading is bounded before and
while parsing: only regular files, at most ``MAX_BYTES``, strict UTF-8, at most ``MAX_NODES``
nodes (counting every alias expansion), ``MAX_ALIASES`` aliases and ``MAX_DEPTH`` levels of
nesting, and scalar keys only. PyYAML's pure-Python parser handles ~45k nodes/s here, so the
node budget, not the byte limit, is what keeps the worst file under a second and a few MB.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Path_ = tuple[Any, ...]

MAX_BYTES = 256 * 1024  # a real recipe is ~1 kB; an Olive pass list a few kB
MAX_NODES = 10_000  # mappings, sequences and scalars, aliases counted as often as they are expanded
MAX_ALIASES = 100
MAX_DEPTH = 32


class YamlInputError(ValueError):
    """The file cannot be loaded as a bounded YAML document; ``line`` is 1-based."""

    def __init__(self, message: str, line: int = 1):
        super().__init__(message)
        self.message = message
        self.line = line


@dataclass
class LoadedYaml:
    data: Any
    lines: dict[Path_, int] = field(default_factory=dict)
    duplicates: list[tuple[Path_, int]] = field(default_factory=list)

    def line_of(self, path: Path_) -> int:
        """The line of the deepest known prefix of ``path`` (1-based; 1 if nothing is known)."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return 1


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_text(path: Path, limit: int = MAX_BYTES) -> str:
    """The file's text, refusing anything but a regular UTF-8 file of at most ``limit`` bytes.

    O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever; the
    type is then checked on the open descriptor, so a file swapped after a check is caught too.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise YamlInputError(f"cannot open it: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise YamlInputError(f"it is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise YamlInputError(f"it is {st.st_size} bytes; a recipe may be at most {limit} bytes")
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        size = 0
        while True:  # read at most limit + 1 bytes: the file may grow while it is read
            try:
                chunk = os.read(fd, min(65536, limit + 1 - size))
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise YamlInputError(f"cannot read it: {e.strerror or e}") from None
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise YamlInputError(f"it is more than {limit} bytes; a recipe may be at most {limit} bytes")
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise YamlInputError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})", line) from None


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader whose composer counts nodes, aliases and depth, and stops at the limits."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.nodes = 0
        self.aliases = 0
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise YamlInputError(f"more than {MAX_ALIASES} aliases (*name); refused", mark.line + 1)
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise YamlInputError(f"more than {MAX_NODES} YAML nodes; refused", mark.line + 1)
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise YamlInputError(f"nested more than {MAX_DEPTH} levels deep; refused", mark.line + 1)
        try:
            node: yaml.Node | None = super().compose_node(parent, index)
            return node
        finally:
            self.depth -= 1


def load(text: str) -> LoadedYaml:
    """Parse one YAML document within the limits above.

    Raises ``yaml.YAMLError`` (with a mark) on bad syntax and ``YamlInputError`` on a limit
    or a value no recipe can hold (a list or mapping as a key, an integer too long to read).
    """
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        out = LoadedYaml(data=None)
        if node is not None:
            budget = _Budget()
            out.data = _build(loader, node, (), out, budget, 0)
        return out
    finally:
        loader.dispose()


@dataclass
class _Budget:
    nodes: int = 0

    def spend(self, node: yaml.Node) -> None:
        # Aliases make the composed graph a DAG (or even a cycle): building it out is where
        # "billion laughs" would explode, so every visit counts, not every distinct node.
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise YamlInputError(f"expands to more than {MAX_NODES} YAML nodes (aliases of aliases?); refused",
                                 node.start_mark.line + 1)


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _merged_size(node: yaml.MappingNode, depth: int, budget: int) -> int:
    """How many entries ``flatten_mapping`` would produce, stopping once past ``budget``."""
    if depth > MAX_DEPTH:
        raise YamlInputError(f"merge keys (<<) nested more than {MAX_DEPTH} levels deep; refused",
                             node.start_mark.line + 1)
    total = 0
    for key, value in node.value:
        if key.tag == _MERGE_TAG:
            subs = value.value if isinstance(value, yaml.SequenceNode) else [value]
            for sub in subs:
                if isinstance(sub, yaml.MappingNode):
                    total += _merged_size(sub, depth + 1, budget - total)
                else:
                    total += 1  # flatten_mapping reports the error
        else:
            total += 1
        if total > budget:
            return total
    return total


def _construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        # e.g. an integer of more than 4300 digits (Python's int-from-text limit)
        raise YamlInputError(f"cannot read this value: {str(e)[:120]}", node.start_mark.line + 1) from None


def _build(loader: yaml.SafeLoader, node: yaml.Node, path: Path_, out: LoadedYaml, budget: _Budget, depth: int) -> Any:
    budget.spend(node)
    if depth > MAX_DEPTH:  # only reachable through aliases: the composer bounds written nesting
        raise YamlInputError(f"nested more than {MAX_DEPTH} levels deep (through aliases); refused",
                             node.start_mark.line + 1)
    out.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        if _merged_size(node, 0, MAX_NODES - budget.nodes) > MAX_NODES - budget.nodes:
            raise YamlInputError(f"merge keys (<<) expand to more than {MAX_NODES} entries; refused",
                                 node.start_mark.line + 1)
        loader.flatten_mapping(node)  # resolves `<<` merge keys
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                kind = "mapping" if isinstance(key_node, yaml.MappingNode) else "list"
                raise YamlInputError(f"a {kind} is used as a key; keys must be plain names", line)
            budget.spend(key_node)
            key = _construct(loader, key_node)
            key_path = path + (key,)
            if key in result:
                out.duplicates.append((key_path, line))
            out.lines[key_path] = line
            result[key] = _build(loader, value_node, key_path, out, budget, depth + 1)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, item, path + (i,), out, budget, depth + 1) for i, item in enumerate(node.value)]
    return _construct(loader, node)
