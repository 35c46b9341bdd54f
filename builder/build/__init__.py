"""Building one step: the container engines (``engine``), the builder and runtime images
(``images``), running a step atomically (``execute``), what runs inside the builder
container (``worker``), checking a model folder (``check``) and evaluating it (``evaluate``).

The worker, the check and the evaluation's measuring side run inside builder images, which
have neither click, pydantic, docker, yaml, requests nor cryptography: this package's
``__init__`` imports nothing, and those modules import only the standard library, the build
stack and ``builder.contract``/``builder.errors``."""
