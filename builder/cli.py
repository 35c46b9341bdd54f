"""The `build` command: parses arguments, calls the library (``builder.pipeline`` and the
stage modules), prints and exits. The only layer that prints or exits; the core raises
BuilderError, and ``main`` turns it into a message and an exit code."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from builder import __version__, console
from builder.console import ConsoleReporter
from builder.errors import BuilderError, UsageError
from builder.oci.media import ADAPTER_ARTIFACT_TYPE, MODEL_ARTIFACT

ENGINES = ("docker", "local")
F = TypeVar("F", bound=Callable[..., Any])

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
sign_key_option = click.option(
    "--sign-key", envvar="OLIVE_BUILDER_SIGN_KEY", default=None, metavar="KEY", show_envvar=False,
    help="Sign the model, both manifests and the attestations with this EC P-256 private key (`build keygen`); "
         "passphrase from OLIVE_BUILDER_SIGN_KEY_PASSWORD. Env: OLIVE_BUILDER_SIGN_KEY (a path or the PEM itself).")
package_options.append(sign_key_option)


def _with(options: list[Callable[[F], F]]) -> Callable[[F], F]:
    def apply(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f
    return apply


with_image_options = _with(image_options)
with_package_options = _with(package_options)


def _package_options(kw: dict[str, Any]) -> Any:
    """PackageOptions from the shared image and package options (removed from ``kw``)."""
    from builder.pipeline import (  # lazy: only the command that runs loads it (build --help stays fast)
        ImageSettings,
        PackageOptions,
    )

    settings = ImageSettings(kw.pop("base_image"), kw.pop("wheels"), kw.pop("runtime_base_image"))
    push_to, no_push = kw.pop("push_to"), kw.pop("no_push")
    return PackageOptions(store=kw.pop("store"), push_to=None if no_push else push_to,
                          runnable_image=not kw.pop("no_image"), insecure=kw.pop("insecure"), images=settings,
                          sign_key=kw.pop("sign_key"))


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
    build eval DIR|REF              accuracy against the source model, and speed
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
@click.option("--require-native-check", is_flag=True, envvar="OLIVE_BUILDER_REQUIRE_NATIVE_CHECK",
              help="Publish only builds checked on their target's own hardware: a build checked by a CPU "
                   "cross-check (no GPU here) stays unpublished in the output folder and exits 4. "
                   "Env: OLIVE_BUILDER_REQUIRE_NATIVE_CHECK.")
@with_image_options
@with_package_options
def recipe_cmd(recipe_file: Path | None, only: str | None, engine: str, output: Path | None, force: bool,
               dry_run: bool, image: str | None, quiet: bool, no_cache: bool, lock_file: Path | None,
               require_locked: bool, require_native_check: bool, **kw: Any) -> None:
    """Build RECIPE_FILE into a checked ONNX Runtime GenAI model folder, then package it.

    The model is packaged into the local OCI store as a ModelPack artifact
    (<name>:<version>-<target>) and a runnable image (<name>:<version>-<target>-serve),
    and pushed with --push (or OLIVE_BUILDER_REGISTRY, or the recipe's `registry`).
    A build whose cache key is already in the local store or the registry is not run again.
    """
    from builder import pipeline  # lazy: only the command that runs loads it (build --help stays fast)

    no_push = kw["no_push"]
    options = pipeline.BuildOptions(engine=engine, output=output, force=force, builder_image=image,
                                    use_cache=not no_cache, lock_file=lock_file, require_locked=require_locked,
                                    package=_package_options(kw), recipe_registry=not no_push,
                                    require_native_check=require_native_check)
    loaded = pipeline.select(recipe_file, only)
    if dry_run:
        click.echo(json.dumps(pipeline.dry_run(loaded, options).to_json(), indent=2))
        return
    console.show_outcome(pipeline.build(loaded, options, ConsoleReporter(quiet)))


@cli.command("list")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_cmd(paths: tuple[Path, ...], as_json: bool) -> None:
    """List every recipe id (<model>/<target>) under PATHS (default: recipes/)."""
    from builder.recipe import format as recipe  # lazy: only the command that runs loads it (build --help stays fast)

    rows: list[dict[str, Any]] = []
    found, problems = recipe.load_many(list(paths))
    for loaded in found:
        r = loaded.recipe
        rows.append({
            "id": loaded.id,
            "recipe": str(loaded.path),
            "device": r.target.device,
            "precision": r.target.precision,
            "model": r.model.hub or r.model.path or (f"{r.model.gguf.package or r.model.gguf.path}: gguf" if r.model.gguf else None),
            "tag": loaded.tag,
        })
    rows.sort(key=lambda row: str(row["id"]))  # by id: cpu-int4 before cpu-int4-faq (paths sort '-' before '.')
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
@click.option("--device", type=click.Choice(["cpu", "cuda", "dml", "webgpu"]), default=None,
              help="Only targets of this device.")
@click.option("--runner-cpu", envvar="OLIVE_BUILDER_RUNNER_CPU", default="ubuntu-latest", show_default=True,
              help="Runner label(s) for cpu targets, comma-separated. Env: OLIVE_BUILDER_RUNNER_CPU.")
@click.option("--runner-cuda", envvar="OLIVE_BUILDER_RUNNER_CUDA", default="self-hosted,gpu", show_default=True,
              help="Runner label(s) for cuda targets, comma-separated. Env: OLIVE_BUILDER_RUNNER_CUDA.")
@click.option("--runner-dml", envvar="OLIVE_BUILDER_RUNNER_DML", default="ubuntu-latest", show_default=True,
              help="Runner label(s) for dml targets (built and CPU-cross-checked on Linux; a Windows GPU runner "
                   "checks them natively). Env: OLIVE_BUILDER_RUNNER_DML.")
@click.option("--runner-webgpu", envvar="OLIVE_BUILDER_RUNNER_WEBGPU", default="ubuntu-latest", show_default=True,
              help="Runner label(s) for webgpu targets. Env: OLIVE_BUILDER_RUNNER_WEBGPU.")
@click.option("--github-output", is_flag=True,
              help="Also append matrix=... and count=... to the file $GITHUB_OUTPUT names (for a workflow step).")
def matrix_cmd(paths: tuple[Path, ...], changed_since: str | None, device: str | None, runner_cpu: str,
               runner_cuda: str, runner_dml: str, runner_webgpu: str, github_output: bool) -> None:
    """Print the GitHub Actions matrix ({"include": [...]}) of the recipes under PATHS (default: recipes/)."""
    import os

    from builder.recipe import matrix  # lazy: only the command that runs loads it (build --help stays fast)

    labels = {"cpu": runner_cpu, "cuda": runner_cuda, "dml": runner_dml, "webgpu": runner_webgpu}
    runners = {device: [r.strip() for r in text.split(",") if r.strip()] for device, text in labels.items()}
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
    from builder.recipe import lock  # lazy: only the command that runs loads it (build --help stays fast)

    resolved = lock.write(list(paths), lock_file)
    for rid, entry in resolved:
        click.echo(f"{rid}  {entry.hub}@{entry.revision}  {entry.commit}")
    click.echo(f"Locked {len(resolved)} recipe(s) in {lock_file}", err=True)


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
    from builder.build import images  # lazy: only the command that runs loads it (build --help stays fast)
    from builder.build.engine import DockerEngine  # lazy: only the command that runs loads it (build --help stays fast)

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
            console.stage("image", f"{spec.tag} is up to date")
            continue
        console.stage("image", f"building {spec.tag} from {spec.dockerfile.name}")
        image_id = images.build_image(eng.client, spec, ConsoleReporter(quiet).log)
        console.stage("image", f"built {spec.tag} ({image_id})")
        click.echo(spec.tag)


@cli.command("serve")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for all).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--model-id", default=None, help="The id clients name in `model` [default: the build's tag].")
@click.option("--max-concurrency", default=None, type=click.IntRange(1, 256),
              help="Generations at once [default: the batch size].")
@click.option("--queue-size", default=16, show_default=True, type=click.IntRange(0),
              help="Requests that may wait for a slot; more get 429.")
@click.option("--batch-size", default=None, type=click.IntRange(1, 256),
              help="Requests the engine batches at once, at most 4 on the CPU engine [default: the model's genai_config, else 4].")
@click.option("--api-key", default=None, envvar="OLIVE_BUILDER_API_KEY", show_envvar=False,
              help="Require `Authorization: Bearer KEY` on /v1 (/health stays open). Env: OLIVE_BUILDER_API_KEY "
                   "(preferred: a command line is visible to other users).")
@click.option("--metrics-need-key", is_flag=True, help="/metrics needs the API key too.")
@click.option("--verify", "verify_key", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="PUB",
              envvar="OLIVE_BUILDER_VERIFY_KEY",
              help="Serve a reference only if it is signed by this public key. Env: OLIVE_BUILDER_VERIFY_KEY.")
@click.option("--host-runtime", is_flag=True,
              help="Serve in this Python (the serve extra) instead of the runtime image in Docker.")
@store_option
@insecure_option
def serve_cmd(model: str, host: str, port: int, model_id: str | None, max_concurrency: int | None, queue_size: int,
              batch_size: int | None, api_key: str | None, metrics_need_key: bool,
              verify_key: Path | None, host_runtime: bool, store: Path | None, insecure: bool) -> None:
    """Serve MODEL with an OpenAI-compatible API, as a deployment of it serves.

    By default in Docker: a reference's runnable image (<tag>-serve), else the runtime image of
    the model's target with the folder mounted read-only. Ctrl-C stops it (in-flight requests
    finish) and removes the container. --host-runtime serves in this Python instead.

    MODEL is a model folder, or a reference: <name>:<tag> in the local store or
    REGISTRY/REPO:TAG (pulled and verified first).
    """
    from builder.build.check import check_files  # lazy: only the command that runs loads it (build --help stays fast)

    is_reference = not Path(model).exists() and (":" in model or "@" in model)
    if verify_key is not None and not is_reference:
        raise UsageError(f"--verify checks a reference's signature; {model} is a folder.",
                         hint="Serve the signed reference (REGISTRY/REPO:TAG or <name>:<tag>) instead.")
    if not is_reference:
        check_files(Path(model))
    if metrics_need_key and not api_key:
        raise UsageError("--metrics-need-key needs an API key.", hint="Set --api-key or OLIVE_BUILDER_API_KEY.")
    if host_runtime:
        _serve_on_host(model, is_reference, store=store, insecure=insecure, verify_key=verify_key, host=host,
                       port=port, model_id=model_id, max_concurrency=max_concurrency, queue_size=queue_size,
                       batch_size=batch_size, api_key=api_key or None, metrics_need_key=metrics_need_key)
        return
    from builder.deploy import local  # lazy: docker-py and the store (build --help stays fast)

    reporter = ConsoleReporter()
    served = local.resolve(model, reporter, store=store, insecure=insecure, verify_key=verify_key)
    options = local.ServerOptions(host=host, port=port, model_id=model_id, max_concurrency=max_concurrency,
                                  queue_size=queue_size, batch_size=batch_size, api_key=api_key or None,
                                  metrics_need_key=metrics_need_key)
    local.serve(served, options, reporter, on_line=lambda line: click.echo(f"    {line}", err=True))


def _serve_on_host(model: str, is_reference: bool, *, store: Path | None, insecure: bool, verify_key: Path | None,
                   **options: Any) -> None:
    """`build serve --host-runtime`: the server in this Python, with this Python's onnxruntime-genai."""
    from builder import pipeline  # lazy: only the command that runs loads it (build --help stays fast)
    from builder.build.check import check_files  # lazy: only the command that runs loads it (build --help stays fast)

    model_dir = Path(model)
    if is_reference:
        model_dir = pipeline.pull_for_serve(model, ConsoleReporter(), store=store, insecure=insecure,
                                            verify_key=verify_key)
        check_files(model_dir)
    try:
        from builder.serve import app as server  # lazy: Starlette and uvicorn (the serve extra)
        from builder.serve.generator import engine_available, load_onnxruntime_genai  # lazy: the server, as above

        og = load_onnxruntime_genai()  # telemetry off before the library loads
    except ImportError as e:
        raise BuilderError(f"The server's dependencies are not installed: {e}",
                           hint="pip install -e '.[serve]' (and onnxruntime-genai), or drop --host-runtime to "
                                "serve in the runtime image.") from None
    if not engine_available(og):
        ConsoleReporter().warn(
            f"onnxruntime-genai {getattr(og, '__version__', '?')} in this Python has no Engine: --host-runtime "
            "serves without continuous batching (one og.Generator per request), unlike the runtime image. "
            "Drop --host-runtime to serve in the runtime image, or serve from a Python with "
            "onnxruntime-genai 0.18 (pip install -e '.[serve]' 'onnxruntime-genai==0.18.0', without the `local` "
            "extra, which pins 0.14.1).")
    code = server.run(model_dir, **options)
    if code:
        raise BuilderError(f"The server stopped: the model in {model_dir} could not be loaded (see above).")


@cli.command("deploy")
@click.argument("ref")
@click.option("-o", "--output", default="-", show_default=True, metavar="DIR|-",
              help="A folder to write, one file per object (NN-kind-name.yaml), or - for one YAML stream on stdout.")
@click.option("--force", is_flag=True, help="Replace DIR if it exists.")
@click.option("--name", default=None, help="Name of every object [default: <model name>-<target>].")
@click.option("--namespace", default=None, help="Namespace to write into the objects [default: none: kubectl's].")
@click.option("--runtime-image", default=None, metavar="REF",
              help="For a model artifact: the runtime image at a registry it runs in (a runtime image you pushed, "
                   "or the model's runnable image).")
@click.option("--model-from", type=click.Choice(["image", "image-volume", "pull"]), default=None,
              help="image: the runnable image alone. image-volume: the artifact as a Kubernetes image volume "
                   "(CRI-O), unpacked and verified by an init container. pull: the init container pulls the "
                   "artifact by digest (containerd) [default: image for a runnable image, image-volume for an "
                   "artifact].")
@click.option("--replicas", default=2, show_default=True, type=click.IntRange(1), help="Replicas (the autoscaler's minimum).")
@click.option("--max-replicas", default=8, show_default=True, type=click.IntRange(1), help="The autoscaler's maximum.")
@click.option("--autoscaler", type=click.Choice(["hpa", "keda", "none"]), default="hpa", show_default=True,
              help="hpa: autoscaling/v2 on the per-pod custom metric olive_server_requests_waiting (needs a custom "
                   "metrics adapter). keda: a KEDA ScaledObject with a Prometheus trigger on the same metric.")
@click.option("--waiting-target", default=2, show_default=True, type=click.IntRange(1),
              help="Requests waiting per pod the autoscaler aims at.")
@click.option("--prometheus-url", default="http://prometheus-operated.monitoring.svc:9090", show_default=True,
              help="Where KEDA queries Prometheus.")
@click.option("--kserve", is_flag=True,
              help="A KServe InferenceService (serving.kserve.io/v1beta1, custom container) instead of the "
                   "Deployment, Service and autoscaler (KServe makes those).")
@click.option("--inference-pool", is_flag=True,
              help="Also an InferencePool (inference.networking.k8s.io/v1) for the Gateway API Inference Extension.")
@click.option("--epp-name", default=None, help="The InferencePool's endpoint picker Service [default: <name>-epp].")
@click.option("--epp-port", default=9002, show_default=True, type=click.IntRange(1, 65535),
              help="The endpoint picker's gRPC port.")
@click.option("--policy-key", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None, metavar="PUB",
              help="Also a sigstore policy-controller ClusterImagePolicy admitting only images signed by this public "
                   "key (the images are checked against it first).")
@click.option("--verify", "verify_key", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="PUB",
              envvar="OLIVE_BUILDER_VERIFY_KEY",
              help="Write nothing unless REF is signed by this public key. Env: OLIVE_BUILDER_VERIFY_KEY.")
@click.option("--api-key-secret", default=None, metavar="SECRET",
              help="Require an API key, read from this Secret's `api-key` (the key itself never enters a manifest).")
@click.option("--pull-secret", default=None, metavar="SECRET",
              help="An image pull secret (kubernetes.io/dockerconfigjson), also given to the pull init container.")
@click.option("--ca-configmap", default=None, metavar="CONFIGMAP",
              help="The registry's CA bundle (key ca.crt) for --model-from pull over HTTPS.")
@click.option("--plain-http", is_flag=True, help="--model-from pull: the registry speaks HTTP (an in-cluster registry).")
@insecure_option
def deploy_cmd(ref: str, output: str, force: bool, name: str | None, namespace: str | None,
               runtime_image: str | None, model_from: str | None, replicas: int, max_replicas: int, autoscaler: str,
               waiting_target: int, prometheus_url: str, kserve: bool, inference_pool: bool, epp_name: str | None,
               epp_port: int, policy_key: Path | None, verify_key: Path | None, api_key_secret: str | None,
               pull_secret: str | None, ca_configmap: str | None, plain_http: bool, insecure: bool) -> None:
    """Write Kubernetes manifests that serve REF, pinned by digest: a pushed runnable image
    (REGISTRY/REPO:VERSION-TARGET-serve) or model artifact (REGISTRY/REPO:VERSION-TARGET, with
    --runtime-image). Requests and limits come from the memory and threads the build measured
    (its evaluation attestation); without one, from the model's size.

    \b
    Deployment (probes on /health, restricted securityContext, graceful drain), Service,
    PodDisruptionBudget, NetworkPolicy (ingress to port 8000, no egress), and an autoscaler
    on olive_server_requests_waiting; optionally an InferenceService, an InferencePool and a
    ClusterImagePolicy. Nothing is written if REF does not resolve or is not ours.
    """
    from builder.deploy import kubernetes, source  # lazy: PyYAML and the registry client

    found = source.resolve(ref, runtime_image=runtime_image, insecure=insecure or None, verify_key=verify_key)
    pem, images = None, tuple[str, ...]()
    if policy_key is not None:
        images = tuple(source.check_policy_key(found, policy_key, insecure=insecure or None))
        pem = policy_key.read_text(encoding="utf-8")
    options = kubernetes.DeployOptions(
        name=name, namespace=namespace, model_from=model_from, replicas=replicas,  # type: ignore[arg-type]
        max_replicas=max(max_replicas, replicas), autoscaler=autoscaler,  # type: ignore[arg-type]
        waiting_target=waiting_target, prometheus_url=prometheus_url, kserve=kserve, inference_pool=inference_pool,
        epp_name=epp_name, epp_port=epp_port, policy_key_pem=pem, policy_images=images,
        api_key_secret=api_key_secret, pull_secret=pull_secret, ca_configmap=ca_configmap, plain_http=plain_http)
    objects = kubernetes.manifests(found, options)
    kinds = ", ".join(o["kind"] for o in objects)
    if output == "-":
        click.echo(kubernetes.render(objects), nl=False)
    else:
        written = kubernetes.write(objects, Path(output), force=force)
        click.echo(f"Wrote {len(written)} manifests to {Path(output)}")
    click.echo(f"{found.model.image}: {kinds} ({found.sizing.basis})", err=True)
    if found.signed and policy_key is None:
        click.echo("REF is signed: --policy-key PUB adds an admission policy that requires the signature.", err=True)


@cli.command("package")
@click.argument("model_dir", type=click.Path(path_type=Path, file_okay=False))
@with_image_options
@with_package_options
def package_cmd(model_dir: Path, **kw: Any) -> None:
    """Package a model folder that `build recipe` made (again) into the local store, and push it with --push."""
    from builder import pipeline  # lazy: only the command that runs loads it (build --help stays fast)
    from builder.build.check import check_files  # lazy: only the command that runs loads it (build --help stays fast)

    check_files(model_dir)
    console.show_packaging(pipeline.package_folder(model_dir, _package_options(kw), ConsoleReporter(quiet=True)))


@cli.command("push")
@click.argument("ref")
@click.option("--to", "destination", envvar="OLIVE_BUILDER_REGISTRY", required=True, metavar="REGISTRY[/NAMESPACE]",
              help="Where to push: REGISTRY/NAMESPACE/<name>:<tag>. Env: OLIVE_BUILDER_REGISTRY.")
@click.option("--no-image", is_flag=True, help="Push the model artifact only, not its runnable image.")
@store_option
@insecure_option
@sign_key_option
def push_cmd(ref: str, destination: str, no_image: bool, store: Path | None, insecure: bool,
             sign_key: str | None) -> None:
    """Push REF (<name>:<tag> in the local store) and its runnable image to a registry, with their
    SBOMs, provenance, evaluation and signatures (referrers)."""
    from builder import pipeline  # lazy: only the command that runs loads it (build --help stays fast)

    console.show_pushed(pipeline.push_with_image(ref, destination, ConsoleReporter(), store=store, insecure=insecure,
                                                 with_image=not no_image, sign_key=sign_key))


@cli.command("pull")
@click.argument("ref")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace DIRECTORY if it exists (only once the pull is verified).")
@click.option("--verify", "verify_key", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="PUB",
              envvar="OLIVE_BUILDER_VERIFY_KEY",
              help="Refuse content not signed by this public key (before anything is downloaded or unpacked). "
                   "Env: OLIVE_BUILDER_VERIFY_KEY.")
@click.option("--signature-out", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="Write the model's OpenSSF model signature here (for `model_signing verify key`).")
@store_option
@insecure_option
def pull_cmd(ref: str, directory: Path, force: bool, verify_key: Path | None, signature_out: Path | None,
             store: Path | None, insecure: bool) -> None:
    """Fetch the model REF into DIRECTORY, verifying every blob (a registry ref, or <name>:<tag> in the local store)."""
    from builder import pipeline  # lazy: only the command that runs loads it (build --help stays fast)

    pulled, dest = pipeline.pull(ref, directory, ConsoleReporter(), store=store, force=force, insecure=insecure,
                                 verify_key=verify_key, signature_out=signature_out)
    click.echo(f"Pulled {pulled.ref}@{pulled.digest} -> {dest}")


@cli.command("gc")
@click.option("--grace", default=3600.0, show_default=True, type=click.FloatRange(0), metavar="SECONDS",
              help="Keep unreferenced blobs younger than this (a running build may be about to tag them).")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@store_option
def gc_cmd(grace: float, dry_run: bool, store: Path | None) -> None:
    """Remove blobs of the local store that no tag reaches, and ingest files of dead writers."""
    from builder.oci import layout as oci  # lazy: only the command that runs loads it (build --help stays fast)

    st = oci.open_store(store)
    report = oci.gc(st, grace_seconds=grace, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {report.removed} blob(s), {report.freed_bytes} bytes freed; {report.kept} kept ({st.root})")


@cli.command("keygen")
@click.argument("prefix", default="olive-builder", type=click.Path(dir_okay=False, path_type=Path))
def keygen_cmd(prefix: Path) -> None:
    """Make a signing key pair: PREFIX.key (EC P-256, private: keep it secret, e.g. as a CI secret)
    and PREFIX.pub (give it to whoever verifies). Encrypted with OLIVE_BUILDER_SIGN_KEY_PASSWORD if set."""
    import os

    from builder.trust import sign  # lazy: only the command that runs loads it (build --help stays fast)

    private, public = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    key_id = sign.keygen(private, public, password=os.environ.get(sign.ENV_SIGN_PASSWORD) or None)
    click.echo(f"private key: {private} (keep it secret)\npublic key:  {public}\nkey id:      sha256:{key_id}")


@cli.command("verify")
@click.argument("ref")
@click.option("--key", "key", required=True, type=click.Path(dir_okay=False, path_type=Path), metavar="PUB",
              envvar="OLIVE_BUILDER_VERIFY_KEY", help="The signer's public key. Env: OLIVE_BUILDER_VERIFY_KEY.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@store_option
@insecure_option
def verify_cmd(ref: str, key: Path, as_json: bool, store: Path | None, insecure: bool) -> None:
    """Check that REF is signed by KEY (cosign's format), that its signed SLSA provenance names this
    manifest, and that a signed SBOM and a passing evaluation are attached. A LoRA adapter's REF:
    also its file against the signed digests, and its base model the same way. Exit 5 if not."""
    from builder.oci import layout as oci  # lazy: only the command that runs loads it (build --help stays fast)
    from builder.trust import verify  # lazy: only the command that runs loads it (build --help stays fast)

    v = verify.verify_reference(ref, key, oci.open_store(store), insecure=insecure or None)
    if as_json:
        def summary(x: verify.Verified) -> dict[str, Any]:
            return {"digest": x.digest, "signature": x.signature, "predicates": sorted(x.predicates),
                    "evaluation": x.evaluation_result, "modelSignature": x.model_bundle is not None,
                    "referrers": list(x.referrers)}

        out: dict[str, Any] = {"reference": ref, **summary(v)}
        if v.base is not None:
            out["adapter"] = v.adapter
            out["base"] = summary(v.base)
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"verified {ref}@{v.digest}")
    click.echo(f"  signature          cosign simple signing, key {key}")
    for ptype in sorted(v.predicates):
        click.echo(f"  attestation        {ptype}")
    click.echo(f"  evaluation         {v.evaluation_result}"
               + ("  (not evaluated)" if v.evaluation_result == "WARNED" else ""))
    click.echo(f"  model signature    {'attached (OpenSSF model signing)' if v.model_bundle else 'none'}")
    if v.base is not None:
        b = v.base
        click.echo(f"  adapter            {v.adapter}: its file matches the signed manifest and SBOM")
        click.echo(f"verified its base (the adapter's subject) @{b.digest}")
        click.echo(f"  signature          cosign simple signing, key {key}")
        for ptype in sorted(b.predicates):
            click.echo(f"  attestation        {ptype}")
        click.echo(f"  evaluation         {b.evaluation_result}" + ("  (not evaluated)" if b.evaluation_result == "WARNED" else ""))
        click.echo(f"  model signature    {'attached (OpenSSF model signing)' if b.model_bundle else 'none'}")


@cli.command("inspect")
@click.argument("ref", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--sbom", "document", flag_value="sbom", default=None, help="Print REF's CycloneDX SBOM.")
@click.option("--provenance", "document", flag_value="provenance", help="Print REF's SLSA provenance statement.")
@click.option("--evaluation", "document", flag_value="evaluation", help="Print REF's evaluation statement.")
@store_option
@insecure_option
def inspect_cmd(ref: str | None, as_json: bool, document: str | None, store: Path | None, insecure: bool) -> None:
    """Show what REF is: its digest, annotations, layers and referrers (SBOM, provenance, evaluation,
    signatures), a registry ref or <name>:<tag> in the local store, and the speed its build measured
    (from the evaluation attestation). Without REF, list what the local store holds."""
    from builder.oci import layout as oci  # lazy: only the command that runs loads it (build --help stays fast)
    from builder.oci import referrers  # lazy: only the command that runs loads it (build --help stays fast)
    from builder.oci.content import open_content  # lazy: requests (the registry client)
    from builder.publish import distribute
    from builder.trust.evaluation_statement import attached_observations  # lazy: as above (the registry client)

    if ref is not None and document is not None:
        with open_content(ref, oci.open_store(store), insecure=insecure or None) as (content, digest):
            doc = referrers.document(content, digest, document)
        if doc is None:
            raise UsageError(f"{ref} has no {document} attached.",
                             hint="Packaging attaches one; `build inspect REF` lists what is attached.")
        click.echo(json.dumps(json.loads(doc), indent=2, sort_keys=True))
        return
    if ref is None:
        st = oci.open_store(store)
        kinds = {MODEL_ARTIFACT: "model artifact", ADAPTER_ARTIFACT_TYPE: "LoRA adapter"}
        rows = [{"reference": name, "digest": d.digest, "kind": kinds.get(d.artifact_type or "", "image")}
                for name, d in sorted(st.refs().items())
                if not referrers.is_referrer_tag(name.rpartition(":")[2])]  # attestation bookkeeping
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
    with open_content(ref, oci.open_store(store), insecure=insecure or None) as (content, digest):
        info["referrers"] = referrers.describe(content, digest)
        # What the build's run observed (speed, seconds) is no part of the manifest: its evaluation
        # attestation says it, one per build run that packaged this very manifest.
        info["observed"] = [{"referrer": found, **seen} for found, seen in attached_observations(content, digest)]
    if info.get("artifactType") == MODEL_ARTIFACT:
        info["adapters"] = distribute.adapter_rows(info["referrers"], info["reference"])
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    console.show_description(info)


@cli.command("eval")
@click.argument("model")
@click.option("--against", default=None, metavar="SOURCE",
              help="The source model: a Hugging Face folder or OWNER/NAME[@REVISION] [default: the build record's].")
@click.option("--precision", type=click.Choice(["int4", "int8", "fp16", "bf16", "fp32"]), default=None,
              help="Apply this precision's default gates [default: the build record's].")
@click.option("--text", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Measure on this UTF-8 text file instead of the committed one.")
@click.option("--max-tokens", type=click.IntRange(64, 65536), default=1024, show_default=True)
@click.option("--no-speed", is_flag=True, help="Do not measure speed.")
@click.option("--json", "as_json", is_flag=True, help="Print the evaluation record as JSON.")
@click.option("--engine", type=click.Choice(["auto", *ENGINES]), default="auto", show_default=True,
              help="local: in this Python (the `local` extra). docker: in the CPU builder image. "
                   "auto: local when torch, transformers and onnxruntime-genai are installed here.")
@store_option
@insecure_option
def eval_cmd(model: str, against: str | None, precision: str | None, text: Path | None, max_tokens: int,
             no_speed: bool, as_json: bool, engine: str, store: Path | None, insecure: bool) -> None:
    """Evaluate MODEL (a model folder, or a reference that is pulled and verified) against its source
    model: perplexity ratio, top-1 agreement, KL divergence, greedy agreement, speed. Exits 4 when a
    gate fails. Runs here with the `local` extra, else in the CPU builder image."""
    from builder import pipeline  # lazy: only the command that runs loads it (build --help stays fast)
    from builder.build import evaluate  # lazy: only the command that runs loads it (build --help stays fast)

    result = pipeline.evaluate_model(model, ConsoleReporter(), against=against, precision=precision, text=text,
                                     max_tokens=max_tokens, speed=not no_speed, engine=engine, store=store,
                                     insecure=insecure)
    data = result.to_json()
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else evaluate.format_table(data))
    evaluate.raise_for_gates(result)


@cli.command("schema")
def schema_cmd() -> None:
    """Print the recipe format as JSON schema (recipes/recipe.schema.json is this output)."""
    from builder.recipe.format import json_schema  # lazy: only the command that runs loads it (build --help stays fast)

    click.echo(json.dumps(json_schema(), indent=2))


@cli.command("check")
@click.argument("folder", type=click.Path(path_type=Path))
def check_cmd(folder: Path) -> None:
    """Check that FOLDER is a usable ONNX Runtime GenAI model (needs onnxruntime-genai here).

    Natively where the hardware of the model's target is; otherwise by a CPU cross-check of
    the same graph (a linked copy with the provider cleared, in a temporary folder)."""
    import tempfile

    from builder.build.check import (  # lazy: only the command that runs loads it (build --help stays fast)
        check_target,
        target_device,
    )

    with tempfile.TemporaryDirectory(prefix="olive-builder-check-") as scratch:
        report, _ = check_target(folder, target_device(folder), scratch=Path(scratch) / "cpu")
    how = "natively" if report.reason is None else f"by a CPU cross-check ({report.reason})"
    click.echo(f"ok: {folder} loads and generated {len(report.generated_ids)} tokens "
               f"(onnxruntime-genai {report.genai_version}), {how}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns every BuilderError into a message and an exit code."""
    try:
        cli.main(args=argv, prog_name="build", standalone_mode=False)
    except BuilderError as e:
        console.fail(e)
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
