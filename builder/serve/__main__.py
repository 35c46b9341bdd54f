"""An OpenAI-compatible HTTP server over one ONNX Runtime GenAI model folder.

    python -m builder.serve --model DIR [--host 0.0.0.0] [--port 8000] [--batch-size 4] [--api-key KEY]

The command line of the runtime images (their ENTRYPOINT): the options, each with its
``OLIVE_*`` variable, then ``builder.serve.app.run``.
"""

from __future__ import annotations

import argparse
import logging
import os

from builder.serve.app import API_KEY_ENV, BODY_TIMEOUT, HEADER_TIMEOUT, WRITE_TIMEOUT, run
from builder.serve.generator import DEFAULT_BATCH_SIZE


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: the command line), serve, and exit with ``run``'s code."""
    env = os.environ.get

    def optional_int(value: str | None) -> int | None:
        return int(value) if value else None

    parser = argparse.ArgumentParser(prog="python -m builder.serve", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default=env("OLIVE_MODEL_DIR", "/model"), help="model folder")
    parser.add_argument("--host", default=env("OLIVE_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("OLIVE_PORT", "8000")))
    parser.add_argument("--model-id", default=env("OLIVE_MODEL_ID"), help="id clients use in `model`")
    parser.add_argument("--max-concurrency", type=int, default=optional_int(env("OLIVE_MAX_CONCURRENCY")),
                        help="requests generating at once (default: the batch size)")
    parser.add_argument("--queue-size", type=int, default=int(env("OLIVE_QUEUE_SIZE", "16")))
    parser.add_argument("--batch-size", type=int, default=optional_int(env("OLIVE_BATCH_SIZE")),
                        help=f"the engine's batch size (default: the model's genai_config, else {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--no-engine", action="store_true", help="generate with og.Generator only (for comparison)")
    parser.add_argument("--drain-seconds", type=float, default=float(env("OLIVE_DRAIN_SECONDS", "30")))
    parser.add_argument("--api-key", default=None,
                        help=f"require `Authorization: Bearer KEY` on /v1 (default: ${API_KEY_ENV}); prefer the "
                             "variable: a command line is visible to other users")
    parser.add_argument("--metrics-need-key", action="store_true", help="/metrics needs the API key too")
    parser.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT,
                        help="seconds a connection may take to send a request's headers")
    parser.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT,
                        help="seconds a request may take to send its body (408 after)")
    parser.add_argument("--write-timeout", type=float, default=float(env("OLIVE_WRITE_TIMEOUT") or WRITE_TIMEOUT),
                        help="seconds a client may leave what it was sent unread (its socket buffers full) before "
                             "the connection is closed and its generation stopped (default: $OLIVE_WRITE_TIMEOUT, "
                             f"else {WRITE_TIMEOUT:g})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(run(args.model, host=args.host, port=args.port, model_id=args.model_id,
                         max_concurrency=args.max_concurrency, queue_size=args.queue_size,
                         drain_seconds=args.drain_seconds, batch_size=args.batch_size,
                         api_key=args.api_key or env(API_KEY_ENV) or None, metrics_need_key=args.metrics_need_key,
                         use_engine=not args.no_engine, header_timeout=args.header_timeout,
                         body_timeout=args.body_timeout, write_timeout=args.write_timeout))


if __name__ == "__main__":
    main()
