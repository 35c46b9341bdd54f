"""The `build` command. The only layer that prints or exits; the core raises BuilderError."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import BuilderError

ENGINES = ("docker", "local")


def _stage(stage: str, message: str) -> None:
    click.secho(f"==> {stage}: ", bold=True, nl=False, err=True)
    click.echo(message, err=True)


_PROGRESS_BAR = re.compile(r"\d+%\|")


def _log(line: str) -> None:
    # Progress bars arrive as one line per redraw: show only finished ones (the log file has all).
    if _PROGRESS_BAR.search(line) and "100%|" not in line:
        return
    click.secho(f"    {line}", dim=True, err=True)


def _fail(error: BuilderError) -> None:
    if error.log_tail:
        click.secho(f"--- last {len(error.log_tail)} lines of the log ---", fg="yellow", err=True)
        for line in error.log_tail:
            click.echo(f"    {line}", err=True)
        click.secho("---", fg="yellow", err=True)
    click.secho("error: ", fg="red", bold=True, nl=False, err=True)
    click.echo(str(error), err=True)


image_options = [
    click.option(
        "--base-image",
        envvar="OLIVE_BUILDER_BASE_IMAGE",
        default=None,
        help="Base image for builder images (default: each Dockerfile's own). Env: OLIVE_BUILDER_BASE_IMAGE.",
    ),
    click.option(
        "--wheels",
        envvar="OLIVE_BUILDER_WHEELS",
        type=click.Path(file_okay=False),
        default=None,
        help="A folder of wheels that pip may use inside image builds (e.g. a CPU torch). Env: OLIVE_BUILDER_WHEELS.",
    ),
]


def with_image_options(f: Any) -> Any:
    for option in reversed(image_options):
        f = option(f)
    return f


store_option = click.option(
    "--store", type=click.Path(file_okay=False, path_type=Path), envvar="OLIVE_BUILDER_STORE", default=None,
    help="The local OCI store [default: ~/.local/share/olive-builder/store]. Env: OLIVE_BUILDER_STORE.")
insecure_option = click.option(
    "--insecure", is_flag=True,
    help="Plain HTTP to the registry (loopback registries and OLIVE_BUILDER_INSECURE_REGISTRIES need no flag).")
package_options = [
    store_option,
    click.option("--push", "push_to", envvar="OLIVE_BUILDER_REGISTRY", default=None, metavar="REGISTRY[/NAMESPACE]",
                 help="Push the artifact and image to REGISTRY/NAMESPACE/<name>:<tag>. Env: OLIVE_BUILDER_REGISTRY."),
    click.option("--no-push", is_flag=True, help="Do not push, even if a registry is configured."),
    click.option("--no-image", is_flag=True, help="Package the model artifact only, not the runnable image."),
    insecure_option,
    click.option("--runtime-base-image", envvar="OLIVE_BUILDER_RUNTIME_BASE_IMAGE", default=None,
                 help="Base image runtime images run on. Env: OLIVE_BUILDER_RUNTIME_BASE_IMAGE."),
]


def with_package_options(f: Any) -> Any:
    for option in reversed(package_options):
        f = option(f)
    return f


class _Progress:
    """Byte progress for long transfers on stderr: on a terminal one line rewritten every 2%;
    elsewhere (CI logs) a line every 25%, and only for transfers over 100 MB."""

    def __init__(self, what: str, total: int):
        self.what = what
        self.tty = sys.stderr.isatty()
        self.step = 2 if self.tty else 25
        self.start(total)

    def start(self, total: int) -> None:
        """(Re)start with ``total`` bytes to go (for transfers whose size is known only later)."""
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


def _runtime_image(client: Any, device: str, *, base_image: str | None, wheels: str | None,
                   runtime_base_image: str | None, quiet: bool) -> str:
    from . import images

    spec = images.image_spec(f"runtime-{device}", base_image=base_image, wheels_dir=wheels,
                             runtime_base_image=runtime_base_image)
    try:
        client.images.get(spec.tag)
    except Exception:  # docker.errors.ImageNotFound: build it once, as for builder images
        _stage("image", f"runtime image {spec.tag} is not built yet; building it (once)")
        images.build_image(client, spec, (lambda line: None) if quiet else _log)
    return spec.tag


def _package_and_push(model_dir: Path, device: str, *, store: Path | None, destination: str | None, no_image: bool,
                      insecure: bool, quiet: bool, recipe_path: Path | None, base_image: str | None,
                      wheels: str | None, runtime_base_image: str | None, client: Any = None) -> None:
    from . import oci, package
    from .engine import DockerEngine
    from .errors import EngineError

    st = oci.open_store(store)
    runtime = None
    if not no_image:
        if client is None:
            try:
                eng = DockerEngine()
                eng.preflight()
                client = eng.client
            except EngineError as e:
                click.secho(f"warning: no runnable image (it needs Docker for the runtime image): {e.message}",
                            fg="yellow", err=True)
        if client is not None:
            tag = _runtime_image(client, device, base_image=base_image, wheels=wheels,
                                 runtime_base_image=runtime_base_image, quiet=quiet)
            runtime = package.import_runtime(client, tag, st)
    _stage("package", f"into the local store {st.root}")
    total = sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file())
    progress = _Progress("packaging", total)
    created = package.created_time(recipe_path, model_dir)
    try:
        result = package.package(Path(model_dir), st, created=created, runtime=runtime, on_bytes=progress)
    finally:
        progress.close()
    click.echo(f"  model artifact  {result.artifact_ref}  {result.artifact.digest}")
    if result.image_ref and result.image:
        click.echo(f"  runnable image  {result.image_ref}  {result.image.digest}")
    if destination:
        _push([r for r in (result.artifact_ref, result.image_ref) if r], st, destination, insecure)


def _push(refs: list[str], st: Any, destination: str, insecure: bool) -> None:
    from . import distribute
    from .registry import parse_destination

    host, namespace = parse_destination(destination)
    total = sum(sum(b.size for b in distribute.manifest_blobs(distribute.local_manifest(st, r)[1])) for r in refs)
    _stage("push", f"{', '.join(refs)} to {host}/{namespace or ''}".rstrip("/"))
    progress = _Progress("uploading", total)
    try:
        report = distribute.push(st, refs, host, namespace, insecure=insecure or None,
                                 on_event=lambda stage, msg: click.echo(f"    {msg}", err=True), on_bytes=progress)
    finally:
        progress.close()
    for remote, digest in report.pushed:
        click.echo(f"  pushed          {remote}@{digest}")
    click.echo(f"  uploaded {report.uploaded} blob(s), {report.uploaded_bytes} bytes; {report.existing} already there, "
               f"{report.mounted} mounted from another repository")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="olive-builder")
def cli() -> None:
    """Build Hugging Face models into checked ONNX Runtime GenAI models with Microsoft Olive.

    \b
    build list                      every recipe id in recipes/
    build recipe FILE --dry-run     the plan and its Olive config, as JSON
    build recipe FILE [--push REG]  build it in a builder container, package it (and push)
    build pull REF DIR              a model from a registry, verified, ready to load
    build inspect REF               what an artifact or image is and was built from
    build matrix                    the GitHub Actions matrix of the recipes
    build images                    build the builder and runtime images
    """


@cli.command("recipe")
@click.argument("recipe_file", required=False, type=click.Path(dir_okay=True, path_type=Path))
@click.option("--only", "only", default=None, metavar="ID",
              help="Build the recipe with this id (<model>/<target>, as `build list` and `build matrix` print) "
                   "found under RECIPE_FILE (a folder; default recipes/).")
@click.option("--engine", type=click.Choice(ENGINES), default="docker", show_default=True,
              help="docker: a builder container. local: Olive in this Python (pip install -e '.[local]').")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: out/<model>/<target>].")
@click.option("--force", is_flag=True, help="Replace an existing output folder once the new build is checked.")
@click.option("--dry-run", is_flag=True, help="Print the build step and Olive config as JSON; build nothing.")
@click.option("--image", default=None, help="Use this builder image instead of the one built from the Dockerfile.")
@click.option("-q", "--quiet", is_flag=True, help="Show stages only, not the build log (a failure still shows its tail).")
@click.option("--no-cache", is_flag=True, help="Build even if the local store or the registry has this build's cache key.")
@click.option("--lock", "lock_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The lock file [default: the first olive-builder.lock in the recipe's folder or above].")
@click.option("--require-locked", is_flag=True, envvar="OLIVE_BUILDER_REQUIRE_LOCKED",
              help="Refuse a Hub recipe whose revision is neither a commit nor in the lock file (for CI).")
@with_image_options
@with_package_options
def recipe_cmd(recipe_file: Path | None, only: str | None, engine: str, output: Path | None, force: bool,
               dry_run: bool, image: str | None, quiet: bool, no_cache: bool, lock_file: Path | None,
               require_locked: bool, base_image: str | None, wheels: str | None,
               store: Path | None, push_to: str | None, no_push: bool, no_image: bool, insecure: bool,
               runtime_base_image: str | None) -> None:
    """Build RECIPE_FILE into a checked ONNX Runtime GenAI model folder, then package it.

    The model is packaged into the local OCI store as a ModelPack artifact
    (<name>:<version>-<target>) and a runnable image (<name>:<version>-<target>-serve),
    and pushed with --push (or OLIVE_BUILDER_REGISTRY, or the recipe's `registry`).
    A build whose cache key is already in the local store or the registry is not run again.
    """
    import dataclasses

    from . import cache, images, plan
    from .engine import DockerEngine, make_engine
    from .execute import default_output, execute

    loaded = _select_recipe(recipe_file, only)
    flavour = loaded.recipe.target.device
    image_spec = None
    if image is None:
        image_spec = images.image_spec(flavour, base_image=base_image, wheels_dir=wheels)
        image = image_spec.tag
    step = plan.plan(loaded, image)
    lock = lock_file or cache.find_lock(loaded.path.parent)
    entry = cache.lock_entry(loaded, lock)
    if require_locked:
        cache.require_locked(loaded, entry, lock)
    if dry_run:
        click.echo(json.dumps(step.to_json(), indent=2))
        return
    destination = None if no_push else (push_to or loaded.recipe.registry)
    if destination:
        from .registry import Registry, parse_destination, repository

        host, namespace = parse_destination(destination)  # a bad destination fails before the build, not after
        registry = Registry(host, insecure=insecure or None)
        try:  # so do missing credentials or rights
            registry.check_push(repository(namespace, loaded.recipe.name))
        finally:
            registry.close()
    eng = make_engine(engine)
    image_id = None
    if isinstance(eng, DockerEngine):
        eng.preflight()
        if image_spec is not None and not eng.has_image(image):
            _stage("image", f"builder image {image} is not built yet; building it (once)")
            images.build_image(eng.client, image_spec, (lambda line: None) if quiet else _log)
        image_id, tools = cache.tools_of_image(eng.client, image)
    else:
        tools = cache.tools_here()

    # The cache key: everything that decides the output, known before Olive runs.
    pinned = cache.pin(loaded, entry, builder_image=image_id or "local", tools=tools)
    key = pinned.key
    if key is None:
        m = loaded.recipe.model
        click.secho(f"note: {m.hub}@{m.revision or 'main'} cannot be resolved to a commit here; building without the cache",
                    fg="yellow", err=True)
    step = dataclasses.replace(step, cache_key=key,
                               model=dataclasses.replace(step.model, resolved=pinned.commit, files=pinned.files))
    out_dir = output or default_output(step)
    if key and not no_cache and _from_cache(step, key, out_dir, force=force, store=store, destination=destination,
                                            no_image=no_image, insecure=insecure, quiet=quiet, base_image=base_image,
                                            wheels=wheels, runtime_base_image=runtime_base_image,
                                            client=eng.client if isinstance(eng, DockerEngine) else None):
        return
    result = execute(
        step,
        eng,
        out_dir,
        force=force,
        on_stage=_stage,
        on_log=(lambda line: None) if quiet else _log,
        image_id=image_id,
    )
    gen = result.info.get("check", {}).get("generated_ids", [])
    click.echo(f"Built {step.id} in {result.seconds:.1f}s -> {result.output}")
    click.echo(f"  checked: onnxruntime-genai {result.info['check'].get('onnxruntime_genai', '?')} loaded it and generated {len(gen)} tokens")
    click.echo(f"  log: {result.log_path}")
    _package_and_push(result.output, flavour, store=store, destination=destination, no_image=no_image,
                      insecure=insecure, quiet=quiet, recipe_path=loaded.path, base_image=base_image,
                      wheels=wheels, runtime_base_image=runtime_base_image,
                      client=eng.client if isinstance(eng, DockerEngine) else None)


def _select_recipe(path: Path | None, only: str | None) -> Any:
    import difflib

    from . import recipe
    from .errors import PlanError, RecipeError

    if only is None:
        if path is None:
            raise click.UsageError("Name a recipe file, or a folder with --only ID.")
        return recipe.load(path)
    candidates = recipe.discover([path] if path else [])
    matches = [p for p in candidates if recipe.recipe_id(p) == only]
    if not matches:
        ids = [recipe.recipe_id(p) for p in candidates]
        close = difflib.get_close_matches(only, ids, n=3, cutoff=0.5)
        raise PlanError(f"No recipe with id {only!r} under {path or 'recipes'}.",
                        hint=("Perhaps you meant: " + ", ".join(close) + "." if close else "") +
                             " `build list` prints every id.")
    if len(matches) > 1:
        raise RecipeError(f"The id {only!r} names {len(matches)} files: {', '.join(map(str, matches))}.")
    return recipe.load(matches[0])


def _from_cache(step: Any, key: str, out_dir: Path, *, force: bool, store: Path | None, destination: str | None,
                no_image: bool, insecure: bool, quiet: bool, base_image: str | None, wheels: str | None,
                runtime_base_image: str | None, client: Any) -> bool:
    """Serve a build from the cache if its key is known: True when nothing is left to build."""
    from . import distribute, oci, package
    from .registry import parse_destination

    st = oci.open_store(store)
    tag = step.tags[0]

    def runtime() -> Any:
        if no_image or client is None:
            return None
        return package.import_runtime(client, _runtime_image(client, step.device, base_image=base_image, wheels=wheels,
                                                             runtime_base_image=runtime_base_image, quiet=quiet), st)

    hit = distribute.reuse_local(st, key, tag, out_dir, force=force, runtime=runtime)
    if hit is not None:
        _stage("cache", f"{key[:19]}... was built before ({hit.found_as}): Olive does not run")
        if hit.output_current:
            _stage("cache", f"{out_dir} is already this build")
        click.echo(f"Cached {step.id} (Olive did not run) -> {out_dir.absolute()}")
        click.echo(f"  model artifact  {tag}  {hit.artifact.digest}")
        if hit.image is not None:
            click.echo(f"  runnable image  {tag}{package.SERVE_SUFFIX}  {hit.image.digest}")
        if destination:
            _push([tag] + ([tag + package.SERVE_SUFFIX] if hit.image is not None else []), st, destination, insecure)
        return True
    if not destination:
        return False
    host, namespace = parse_destination(destination)
    tagged = distribute.reuse_remote(host, namespace, key, tag, with_image=not no_image, insecure=insecure or None)
    if tagged is None:
        return False
    _stage("cache", f"{key[:19]}... was built before (found in {host}): Olive does not run")
    click.echo(f"Cached {step.id} (Olive did not run; found in {host}, nothing downloaded)")
    for remote, digest in tagged:
        click.echo(f"  pushed          {remote}@{digest}")
    click.echo(f"  `build pull {tagged[0][0]} DIR` fetches the model.")
    return True


@cli.command("list")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_cmd(paths: tuple[Path, ...], as_json: bool) -> None:
    """List every recipe id (<model>/<target>) under PATHS (default: recipes/)."""
    from . import recipe

    rows: list[dict[str, Any]] = []
    found, problems = recipe.load_many(list(paths))
    for loaded in found:
        r = loaded.recipe
        rows.append({
            "id": loaded.id,
            "recipe": str(loaded.path),
            "device": r.target.device,
            "precision": r.target.precision,
            "model": r.model.hub or r.model.path,
            "tag": loaded.tag,
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif rows:
        cols = ["id", "device", "precision", "model", "tag"]
        widths = {c: max(len(c), *(len(str(row[c])) for row in rows)) for c in cols}
        click.echo("  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip())
        for row in rows:
            click.echo("  ".join(str(row[c]).ljust(widths[c]) for c in cols).rstrip())
    if problems:
        raise recipe.invalid(problems)
    if not rows and not as_json:
        click.echo("No recipes found.", err=True)


@cli.command("matrix")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--changed-since", default=None, metavar="GIT_REF",
              help="Only recipes/targets whose build inputs changed since GIT_REF (the recipe, its lock entry, "
                   "its local model files, the builder Dockerfile, the runtime Dockerfile, olive-builder's version).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Only targets of this device.")
@click.option("--runner-cpu", envvar="OLIVE_BUILDER_RUNNER_CPU", default="ubuntu-latest", show_default=True,
              help="Runner label(s) for cpu targets, comma-separated. Env: OLIVE_BUILDER_RUNNER_CPU.")
@click.option("--runner-cuda", envvar="OLIVE_BUILDER_RUNNER_CUDA", default="self-hosted,gpu", show_default=True,
              help="Runner label(s) for cuda targets, comma-separated. Env: OLIVE_BUILDER_RUNNER_CUDA.")
@click.option("--github-output", is_flag=True,
              help="Also append matrix=... and count=... to the file $GITHUB_OUTPUT names (for a workflow step).")
def matrix_cmd(paths: tuple[Path, ...], changed_since: str | None, device: str | None, runner_cpu: str,
               runner_cuda: str, github_output: bool) -> None:
    """Print the GitHub Actions matrix ({"include": [...]}) of the recipes under PATHS (default: recipes/)."""
    import os

    from . import matrix

    runners = {"cpu": [r.strip() for r in runner_cpu.split(",") if r.strip()],
               "cuda": [r.strip() for r in runner_cuda.split(",") if r.strip()]}
    include = matrix.entries(list(paths), device=device, runners=runners, changed_since=changed_since)
    text = json.dumps({"include": include}, separators=(",", ":"), sort_keys=True)
    click.echo(text)
    if github_output:
        target = os.environ.get("GITHUB_OUTPUT")
        if not target:
            raise click.UsageError("--github-output needs GITHUB_OUTPUT (set by GitHub Actions).")
        with open(target, "a", encoding="utf-8") as f:
            f.write(f"matrix={text}\ncount={len(include)}\n")


@cli.command("lock")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--lock", "lock_file", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("olive-builder.lock"), show_default=True, help="The lock file to write.")
def lock_cmd(paths: tuple[Path, ...], lock_file: Path) -> None:
    """Resolve every Hub recipe's revision to a commit (and file hashes) and write the lock file.

    `build recipe` finds the lock in the recipe's folder or above, builds the recorded
    commit, and checks the recorded file hashes; --require-locked refuses recipes without an entry.
    """
    import os

    from . import cache, recipe
    from .errors import PlanError

    existing = cache.read_lock(lock_file)["recipes"] if lock_file.exists() else {}
    entries = dict(existing)
    problems: list[str] = []
    rows: list[tuple[str, str, str]] = []
    for path in recipe.discover(list(paths)):
        loaded = recipe.load(path)
        m = loaded.recipe.model
        if not m.hub:
            continue
        revision = m.revision or "main"
        commit = cache.resolve_hub(m.hub, revision)
        if commit is None:
            problems.append(f"{loaded.id}: {m.hub}@{revision} could not be resolved (no Hub access and not in the cache)")
            continue
        entries[loaded.id] = {"hub": m.hub, "revision": revision, "commit": commit, "files": cache.hub_files(m.hub, commit)}
        rows.append((loaded.id, f"{m.hub}@{revision}", commit))
    if problems:
        raise PlanError("Some revisions could not be resolved; the lock file was not changed:\n  " + "\n  ".join(problems),
                        hint="Run where the Hugging Face Hub is reachable (HF_TOKEN for private models), "
                             "or with the models in the Hugging Face cache and HF_HUB_OFFLINE=1.")
    tmp = lock_file.with_name(f".{lock_file.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"version": 1, "recipes": entries}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, lock_file)
    for row in rows:
        click.echo("  ".join(row))
    click.echo(f"Locked {len(rows)} recipe(s) in {lock_file}", err=True)


@cli.command("images")
@click.option("--target", "targets", type=click.Choice(["cpu", "cuda", "runtime-cpu", "runtime-cuda", "all"]),
              multiple=True, default=["cpu"], show_default=True,
              help="Which images: builders (cpu, cuda), runtimes (runtime-cpu, runtime-cuda), or all. Repeatable.")
@click.option("--runtime-base-image", envvar="OLIVE_BUILDER_RUNTIME_BASE_IMAGE", default=None,
              help="Base image runtime images run on (default: --base-image, else the Dockerfile's own). "
                   "Env: OLIVE_BUILDER_RUNTIME_BASE_IMAGE.")
@click.option("--print-tags", is_flag=True, help="Print the tags the images would have; build nothing.")
@click.option("-q", "--quiet", is_flag=True, help="Do not stream the image build log.")
@with_image_options
def images_cmd(targets: tuple[str, ...], runtime_base_image: str | None, print_tags: bool, quiet: bool,
               base_image: str | None, wheels: str | None) -> None:
    """Build builder and runtime images (tags derived from their content; unchanged images are not rebuilt)."""
    from . import images
    from .engine import DockerEngine

    flavours = list(images.FLAVOURS) if "all" in targets else list(dict.fromkeys(targets))
    specs = [images.image_spec(f, base_image=base_image, wheels_dir=wheels, runtime_base_image=runtime_base_image)
             for f in flavours]
    if print_tags:
        for spec in specs:
            click.echo(spec.tag)
        return
    eng = DockerEngine()
    eng.preflight()
    for spec in specs:
        if eng.has_image(spec.tag):
            _stage("image", f"{spec.tag} is up to date")
            continue
        _stage("image", f"building {spec.tag} from {spec.dockerfile.name}")
        image_id = images.build_image(eng.client, spec, (lambda line: None) if quiet else _log)
        _stage("image", f"built {spec.tag} ({image_id})")
        click.echo(spec.tag)


@cli.command("serve")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for all).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--model-id", default=None, help="The id clients name in `model` [default: the build's tag].")
@click.option("--max-concurrency", default=4, show_default=True, type=click.IntRange(1), help="Generations at once.")
@click.option("--queue-size", default=16, show_default=True, type=click.IntRange(0),
              help="Requests that may wait for a slot; more get 429.")
@store_option
@insecure_option
def serve_cmd(model: str, host: str, port: int, model_id: str | None, max_concurrency: int, queue_size: int,
              store: Path | None, insecure: bool) -> None:
    """Serve MODEL with an OpenAI-compatible API (as the runtime image does), on this host.

    MODEL is a model folder, or a reference: <name>:<tag> in the local store or
    REGISTRY/REPO:TAG, pulled (verified) into ~/.cache/olive-builder/models first.
    """
    from .check import check_files
    from .errors import BuilderError

    model_dir = Path(model)
    if not model_dir.exists() and (":" in model or "@" in model):
        model_dir = _pulled(model, store, insecure)
    check_files(model_dir)
    try:
        from . import server
    except ImportError as e:
        raise BuilderError(f"The server's dependencies are not installed: {e}",
                           hint="pip install -e '.[serve]' (and onnxruntime-genai).") from None
    code = server.run(model_dir, host=host, port=port, model_id=model_id, max_concurrency=max_concurrency,
                      queue_size=queue_size)
    if code:
        raise BuilderError(f"The server stopped: the model in {model_dir} could not be loaded (see above).")


def _pulled(ref_text: str, store: Path | None, insecure: bool) -> Path:
    """The model folder for a reference: unpacked once per manifest digest under the cache."""
    import os

    from . import distribute, oci
    from .registry import parse_reference

    st = oci.open_store(store)
    ref = parse_reference(ref_text)
    _, desc, manifest = distribute.fetch(ref, st, insecure=insecure or None,
                                         on_event=lambda stage, msg: click.echo(f"    {msg}", err=True))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "olive-builder" / "models"
    folder = cache / desc.digest.split(":", 1)[1]
    if not folder.is_dir():
        distribute.materialize(st, manifest, folder, force=False, shown=ref_text)
    _stage("serve", f"{ref_text}@{desc.digest} from {folder}")
    return folder


@cli.command("package")
@click.argument("model_dir", type=click.Path(path_type=Path, file_okay=False))
@with_image_options
@with_package_options
def package_cmd(model_dir: Path, base_image: str | None, wheels: str | None, store: Path | None,
                push_to: str | None, no_push: bool, no_image: bool, insecure: bool, runtime_base_image: str | None) -> None:
    """Package a model folder that `build recipe` made (again) into the local store, and push it with --push."""
    from .check import check_files
    from .package import read_info

    check_files(model_dir)
    info = read_info(model_dir)
    destination = None if no_push else push_to
    _package_and_push(model_dir, info["target"].get("device", "cpu"), store=store, destination=destination,
                      no_image=no_image, insecure=insecure, quiet=True, recipe_path=None, base_image=base_image,
                      wheels=wheels, runtime_base_image=runtime_base_image)


@cli.command("push")
@click.argument("ref")
@click.option("--to", "destination", envvar="OLIVE_BUILDER_REGISTRY", required=True, metavar="REGISTRY[/NAMESPACE]",
              help="Where to push: REGISTRY/NAMESPACE/<name>:<tag>. Env: OLIVE_BUILDER_REGISTRY.")
@click.option("--no-image", is_flag=True, help="Push the model artifact only, not its runnable image.")
@store_option
@insecure_option
def push_cmd(ref: str, destination: str, no_image: bool, store: Path | None, insecure: bool) -> None:
    """Push REF (<name>:<tag> in the local store) and its runnable image to a registry."""
    from . import oci
    from .package import SERVE_SUFFIX

    st = oci.open_store(store)
    refs = [ref]
    if not no_image and not ref.endswith(SERVE_SUFFIX) and st.resolve(ref + SERVE_SUFFIX) is not None:
        refs.append(ref + SERVE_SUFFIX)
    _push(refs, st, destination, insecure)


@cli.command("pull")
@click.argument("ref")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace DIRECTORY if it exists (only once the pull is verified).")
@store_option
@insecure_option
def pull_cmd(ref: str, directory: Path, force: bool, store: Path | None, insecure: bool) -> None:
    """Fetch the model REF into DIRECTORY, verifying every blob (a registry ref, or <name>:<tag> in the local store)."""
    from . import distribute, oci

    st = oci.open_store(store)
    progress = _Progress("downloading", 0)
    try:
        _, desc, dest = distribute.pull(ref, directory, st, force=force, insecure=insecure or None,
                                        on_event=lambda stage, msg: click.echo(f"    {msg}", err=True),
                                        on_bytes=progress, on_start=progress.start)
    finally:
        progress.close()
    click.echo(f"Pulled {ref}@{desc.digest} -> {dest}")


@cli.command("inspect")
@click.argument("ref", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@store_option
@insecure_option
def inspect_cmd(ref: str | None, as_json: bool, store: Path | None, insecure: bool) -> None:
    """Show what REF is: its digest, annotations and layers (a registry ref, or <name>:<tag> in the
    local store). Without REF, list what the local store holds."""
    from . import distribute, oci

    if ref is None:
        st = oci.open_store(store)
        rows = [{"reference": name, "digest": d.digest,
                 "kind": "model artifact" if d.artifact_type == oci.MODEL_ARTIFACT else "image"}
                for name, d in sorted(st.refs().items())]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        if not rows:
            click.echo(f"The local store {st.root} is empty.", err=True)
        width = max((len(r["reference"]) for r in rows), default=0)
        for r in rows:
            click.echo(f"{r['reference'].ljust(width)}  {r['kind']:<14}  {r['digest']}")
        return
    info = distribute.describe(ref, oci.open_store(store), insecure=insecure or None)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    click.echo(f"{info['reference']}  ({info['kind']})")
    click.echo(f"  digest        {info['digest']}")
    if info.get("runnableImage"):
        click.echo(f"  runnable as   {info['runnableImage']}")
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


@cli.command("schema")
def schema_cmd() -> None:
    """Print the recipe format as JSON schema (recipes/recipe.schema.json is this output)."""
    from .recipe import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@cli.command("check")
@click.argument("folder", type=click.Path(path_type=Path))
def check_cmd(folder: Path) -> None:
    """Check that FOLDER is a usable ONNX Runtime GenAI model (needs onnxruntime-genai here)."""
    from .check import check_generates

    report = check_generates(folder)
    click.echo(f"ok: {folder} loads and generated {len(report.generated_ids)} tokens "
               f"(onnxruntime-genai {report.genai_version})")


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns every BuilderError into a message and an exit code."""
    try:
        cli.main(args=argv, prog_name="build", standalone_mode=False)
    except BuilderError as e:
        _fail(e)
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        # Every stage cleans up in its own `finally` before we get here.
        click.echo("Interrupted; nothing was left behind.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(0)
