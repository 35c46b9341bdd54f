"""Every media type and artifact type olive-builder writes or reads, in one place.

A manifest's ``mediaType``, ``artifactType`` and each descriptor's ``mediaType`` are how
registries, cosign, Kyverno and ``build inspect`` tell our documents apart, so each value
has exactly one name, here. Annotation keys and in-toto predicate types are names of another
kind and live with the contract (``builder.contract``).
"""

from __future__ import annotations

# ---- OCI image spec (https://github.com/opencontainers/image-spec) ---------------------------
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
IMAGE_LAYER = "application/vnd.oci.image.layer.v1.tar"
IMAGE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
IMAGE_LAYER_PREFIX = "application/vnd.oci.image.layer"  # how every image layer type starts
EMPTY_MEDIA = "application/vnd.oci.empty.v1+json"  # the config of an artifact that needs none: b"{}"

# ---- what Docker writes (read when a registry answers with them) ----------------------------
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

# ---- CNCF ModelPack (https://github.com/modelpack/model-spec): the model artifact ------------
MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODEL_WEIGHT = "application/vnd.cncf.model.weight.v1.tar"
MODEL_WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.tar"
MODEL_LAYER_TYPES = (MODEL_WEIGHT, MODEL_WEIGHT_CONFIG)

# ---- a LoRA adapter: an artifact of its own whose subject is the base model's manifest -------
ADAPTER_ARTIFACT_TYPE = "application/vnd.olive-builder.adapter.v1"
ADAPTER_CONFIG = "application/vnd.olive-builder.adapter.config.v1+json"  # describes it, names its base
ADAPTER_MEDIA_TYPE = "application/vnd.olive-builder.adapter.onnx-adapter"  # the adapter file's layer

# ---- the supply chain: referrers of a model or image ------------------------------------------
SBOM_MEDIA = "application/vnd.cyclonedx+json"
INTOTO_MEDIA = "application/vnd.in-toto+json"  # an in-toto statement; also DSSE's payloadType for one
DSSE_MEDIA = "application/vnd.dsse.envelope.v1+json"
SIMPLE_SIGNING_MEDIA = "application/vnd.dev.cosign.simplesigning.v1+json"  # what a cosign signature signs
COSIGN_SIG_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
COSIGN_ATT_ARTIFACT = "application/vnd.dev.cosign.artifact.att.v1+json"
SIGSTORE_BUNDLE_MEDIA = "application/vnd.dev.sigstore.bundle.v0.3+json"  # the OpenSSF model signature
