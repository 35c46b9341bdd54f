"""What the supply-chain attachments cost, on bench_package.py's synthetic ~1 GB model folder.

1. Push: the same build pushed to a fresh registry (docker-registry on loopback, started
   and stopped here) from a store packaged without attachments and from one packaged with
   SBOM, provenance, evaluation and signatures (cosign format and OpenSSF model signing).
   Runs alternate; medians and their ratio are printed (goal: the attachments add <= 5 %),
   with the bytes the attachments add (referrer manifests, their blobs, the index).
2. Re-push of the unchanged signed build: bytes uploaded (goal 0).
3. Packaging: without attachments, with attestations, with attestations and a key.

    python benchmarks/bench_supply_chain.py [--runs 3] [--size-mb 1024]

Set TMPDIR to a folder with room for ~4x the size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from bench_package import T0, synthetic_model  # noqa: E402

from builder.oci import layout as oci  # noqa: E402
from builder.oci import referrers  # noqa: E402
from builder.publish import (  # noqa: E402
    distribute,  # noqa: E402
    package,
)
from builder.trust import sign  # noqa: E402
from conftest import RegistryProcess  # noqa: E402


def timed(fn, *args, **kw):  # type: ignore[no-untyped-def]
    """(seconds, result) of ``fn(*args, **kw)``."""
    t = time.perf_counter()
    result = fn(*args, **kw)
    return time.perf_counter() - t, result


def attachment_bytes(store: oci.Store, name: str, subject: str) -> tuple[int, int, int]:
    """(referrer manifests, bytes of their manifests, bytes of their distinct blobs) plus the index."""
    entries = referrers.list_local(store, name, subject)
    blobs: dict[str, int] = {}
    manifest_bytes = 0
    for d in entries:
        manifest_bytes += d.size
        m = store.read_json(d.digest)
        for b in [m["config"], *m["layers"]]:
            blobs[b["digest"]] = b["size"]
    index = store.resolve(f"{name}:{referrers.index_tag(subject)}")
    return len(entries), manifest_bytes + (index.size if index else 0), sum(blobs.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mb", type=int, default=1024)
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-supply-chain-"))
    try:
        model = synthetic_model(scratch / "model", args.size_mb, "cpu-int4", 1)
        size = sum(p.stat().st_size for p in model.iterdir()) / 1e9
        sign.keygen(scratch / "k.pem", scratch / "k.pub")
        key = sign.load_signing_key(str(scratch / "k.pem"), env={})

        # packaging
        pack: dict[str, list[float]] = {"none": [], "attested": [], "signed": []}
        for i in range(args.runs):
            for label, kw in (("none", {"attestations": False}), ("attested", {}), ("signed", {"sign_key": key})):
                store_dir = scratch / f"pack-{label}"
                shutil.rmtree(store_dir, ignore_errors=True)
                pack[label].append(timed(package.package, model, oci.Store(store_dir), created=T0, **kw)[0])
            print(f"  packaging run {i + 1}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in pack.items()))
        base = statistics.median(pack["none"])
        print(f"packaging {size:.2f} GB: median no attachments {base:.2f}s, attestations "
              f"{statistics.median(pack['attested']):.2f}s ({statistics.median(pack['attested']) / base:.2f}x), "
              f"attestations + signatures {statistics.median(pack['signed']):.2f}s "
              f"({statistics.median(pack['signed']) / base:.2f}x)")

        plain = oci.Store(scratch / "store-plain")
        p = package.package(model, plain, created=T0, attestations=False)
        signed = oci.Store(scratch / "store-signed")
        package.package(model, signed, created=T0, sign_key=key)
        count, manifest_bytes, blob_bytes = attachment_bytes(signed, "bench", p.artifact.digest)
        print(f"attachments: {count} referrer manifests ({manifest_bytes} bytes of manifests and index), "
              f"{blob_bytes} bytes of blobs")

        # push; the referrer manifests and index are timed on their own too: they are the part of the
        # attachments that cannot overlap the model's upload (their blobs go up beside it)
        serial: list[float] = []
        original = referrers.push_referrers

        def timed_referrers(*a, **kw):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                if current[0] == "signed":
                    serial.append(time.perf_counter() - t)

        current = [""]

        referrers.push_referrers = timed_referrers  # type: ignore[assignment]
        times: dict[str, list[float]] = {"plain": [], "signed": []}
        for i in range(args.runs):
            for label, store in (("plain", plain), ("signed", signed)):
                current[0] = label
                (store.root / distribute.LOCATIONS).unlink(missing_ok=True)  # no mounts from earlier runs
                registry = RegistryProcess(scratch / f"registry-{label}-{i}").start()
                try:
                    took, r = timed(distribute.push, store, [p.artifact_ref], registry.host, "bench")
                    times[label].append(took)
                    extra = f", referrers {r.referrers} ({r.referrer_uploaded_bytes} bytes of blobs)" if r.referrers else ""
                    print(f"  push run {i + 1} {label:6}: {times[label][-1]:.2f}s, uploaded {r.uploaded_bytes} bytes{extra}")
                    if label == "signed" and i == args.runs - 1:
                        t, a = timed(distribute.push, store, [p.artifact_ref], registry.host, "bench")
                        print(f"re-push of the unchanged signed build: {t:.2f}s, uploaded {a.uploaded} blob(s) "
                              f"{a.uploaded_bytes} bytes, referrer blobs {a.referrer_uploaded_bytes} bytes "
                              f"({a.referrers} referrer manifests re-put, same digests)")
                finally:
                    registry.stop()
                    shutil.rmtree(scratch / f"registry-{label}-{i}", ignore_errors=True)
        referrers.push_referrers = original  # type: ignore[assignment]
        b, s = statistics.median(times["plain"]), statistics.median(times["signed"])
        tail = statistics.median(serial[: args.runs])  # first pushes only (the re-push is the last one)
        print(f"push {size:.2f} GB: median without attachments {b:.2f}s, with {s:.2f}s -> "
              f"{(s - b) / b * 100:+.1f}% ({s - b:+.2f}s; goal <= 5 %); referrer manifests and index after the "
              f"model's manifests: median {tail:.3f}s = {tail / b * 100:.1f}% of the plain push")
        print(json.dumps({"push_plain_s": times["plain"], "push_signed_s": times["signed"],
                          "package_s": pack, "attachment_manifest_bytes": manifest_bytes,
                          "attachment_blob_bytes": blob_bytes}))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
