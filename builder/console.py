"""The terminal side of the CLI: a Reporter that prints progress to stderr, and the
formatting of outcomes. Results go to stdout, everything else to stderr."""

from __future__ import annotations

import re
import sys
from typing import Any

import click

from builder.build.evaluate.report import observed_table, table_from_annotations
from builder.errors import BuilderError
from builder.oci.credentials import known_secrets, redact
from builder.pipeline import BuildOutcome, Packaging
from builder.publish.distribute import PushReport as Pushed
from builder.reporting import Progress

_PROGRESS_BAR = re.compile(r"\d+%\|")


def stage(stage: str, message: str) -> None:
    click.secho(f"==> {stage}: ", bold=True, nl=False, err=True)
    click.echo(message, err=True)


def fail(error: BuilderError) -> None:
    """An error for a person: the log tail that explains it, then what failed and what to do.
    Whatever a server, the Hub or a build printed may echo a secret we hold: it is redacted."""
    secrets = known_secrets()
    if error.log_tail:
        click.secho(f"--- last {len(error.log_tail)} lines of the log ---", fg="yellow", err=True)
        for line in error.log_tail:
            click.echo(f"    {redact(line, secrets)}", err=True)
        click.secho("---", fg="yellow", err=True)
    click.secho("error: ", fg="red", bold=True, nl=False, err=True)
    click.echo(redact(str(error), secrets), err=True)


class ByteProgress:
    """Byte progress for long transfers on stderr: on a terminal one line rewritten every 2%;
    elsewhere (CI logs) a line every 25%, and only for transfers over 100 MB."""

    def __init__(self, what: str, total: int):
        self.what = what
        self.tty = sys.stderr.isatty()
        self.step = 2 if self.tty else 25
        self.start(total)

    def start(self, total: int) -> None:
        self.total, self.done, self.bucket = max(total, 1), 0, -1
        self.quiet = not self.tty and total <= 100_000_000

    def __call__(self, n: int) -> None:
        self.done += n
        pct = max(0, min(int(100 * self.done / self.total), 100))
        if self.quiet or pct // self.step == self.bucket:
            return
        self.bucket = pct // self.step
        line = f"    {self.what}: {pct:3d}% of {self.total / 1e6:.1f} MB"
        click.echo("\r" + line if self.tty else line, nl=not self.tty, err=True)

    def close(self) -> None:
        if self.tty and self.bucket >= 0:
            click.echo("", err=True)


class ConsoleReporter:
    """Stages and events always; long logs unless ``quiet`` (the log file keeps them all)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def stage(self, name: str, message: str) -> None:
        stage(name, message)

    def log(self, line: str) -> None:
        # Progress bars arrive as one line per redraw: show only finished ones.
        if self.quiet or (_PROGRESS_BAR.search(line) and "100%|" not in line):
            return
        click.secho(f"    {line}", dim=True, err=True)

    def event(self, message: str) -> None:
        click.echo(f"    {message}", err=True)

    def warn(self, message: str) -> None:
        click.secho(f"warning: {message}", fg="yellow", err=True)

    def progress(self, what: str, total: int) -> Progress:
        return ByteProgress(what, total)


def show_packaging(p: Packaging) -> None:
    click.echo(f"  model artifact  {p.artifact.ref}  {p.artifact.digest}")
    for a in p.adapters:
        click.echo(f"  LoRA adapter    {a.ref}  {a.digest}")
    if p.image is not None:
        click.echo(f"  runnable image  {p.image.ref}  {p.image.digest}")
    if p.pushed is not None:
        show_pushed(p.pushed)


def show_pushed(p: Pushed) -> None:
    for ref in p.refs:
        click.echo(f"  pushed          {ref.ref}@{ref.digest}")
    if p.uploaded or p.existing or p.mounted:
        click.echo(f"  uploaded {p.uploaded} blob(s), {p.uploaded_bytes} bytes; {p.existing} already there, "
                   f"{p.mounted} mounted from another repository")


def show_outcome(o: BuildOutcome) -> None:
    if o.built is not None:
        r = o.built
        gen = r.record.check.get("generated_ids", [])
        click.echo(f"Built {o.id} in {r.seconds:.1f}s -> {r.output}")
        click.echo(f"  checked: onnxruntime-genai {r.record.check.get('onnxruntime_genai', '?')} loaded it and "
                   f"generated {len(gen)} tokens")
        click.echo(f"  log: {r.log_path}")
    elif o.hit is not None and o.output is not None:
        click.echo(f"Cached {o.id} (Olive did not run) -> {o.output}")
    elif o.hit is not None:
        click.echo(f"Cached {o.id} (Olive did not run; found in {o.hit.where}, nothing downloaded)")
        if o.pushed is not None:
            show_pushed(o.pushed)
        if o.hit.remote:
            click.echo(f"  `build pull {o.hit.remote[0][0]} DIR` fetches the model.")
        return
    if o.packaging is not None:
        show_packaging(o.packaging)


def show_description(info: dict[str, Any]) -> None:
    """`build inspect REF` as a table."""
    click.echo(f"{info['reference']}  ({info['kind']})")
    click.echo(f"  digest        {info['digest']}")
    if info.get("runnableImage"):
        click.echo(f"  runnable as   {info['runnableImage']}")
    if info.get("adapter"):
        click.echo(f"  adapter       {info['adapter']['name']} of the base {info['adapter']['baseReference']}")
    for a in info.get("adapters") or []:
        click.echo(f"  adapter       {a['name']}  {a['reference']}  {a['digest']}")
    click.echo(f"  size          {info['size']} bytes in {len(info['layers'])} layers")
    ann = info["annotations"]
    if ann:
        width = max(len(k) for k in ann)
        click.echo("annotations:")
        for key in sorted(ann):
            click.echo(f"  {key.ljust(width)}  {ann[key]}")
    click.echo("layers:")
    for layer in info["layers"]:
        where = layer.get("path") or ""
        click.echo(f"  {layer['digest'][:19]}  {layer['size']:>12}  {layer['mediaType']}  {where}".rstrip())
    found = info.get("referrers") or []
    click.echo(f"referrers ({len(found)}):" if found else "referrers: none")
    for r in found:
        click.echo(f"  {r['kind']:<16} {r['digest'][:19]}  {r['artifactType']}"
                   + (f"  {r['predicateType']}" if r.get("predicateType") else ""))
    click.echo("evaluation:")
    click.echo(table_from_annotations(ann or {}))
    for seen in info.get("observed") or []:
        click.echo(f"observed by the build that packaged it (evaluation attestation {str(seen['referrer'])[:19]}, "
                   "not part of the digests):")
        click.echo(observed_table(seen))
