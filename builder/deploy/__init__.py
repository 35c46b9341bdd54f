"""Where a built model runs: on this machine through Docker (``local``: what ``build serve``
starts by default, the same runtime image a cluster runs) and on Kubernetes (``kubernetes``:
the manifests ``build deploy`` writes for a pushed artifact, pinned by digest, from what
``source`` resolves at the registry: the manifest, the image config, the measured sizing)."""
