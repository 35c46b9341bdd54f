"""The evaluation on the command line: ``python -m builder.build.evaluate MODEL_DIR [--against
SOURCE_DIR] [--precision P] [--json]`` prints the table (or the record as JSON) and exits 4 when a
gate fails. ``evaluate_in_image`` runs it in a builder image with ``--record-line``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from builder.build.evaluate import evaluate
from builder.build.evaluate.gates import Settings
from builder.build.evaluate.report import RECORD_PREFIX, format_table
from builder.build.measure import DEFAULT_MAX_TOKENS, AdapterUnderTest
from builder.errors import BuilderError, EvaluationError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m builder.build.evaluate",
                                     description="Evaluation: the checked model against its source model, and its "
                                     "speed, before packaging.")
    parser.add_argument("model_dir")
    parser.add_argument("--against", help="the source Hugging Face model folder")
    parser.add_argument("--precision", help="gates of this precision (default: olive-builder.json's)")
    parser.add_argument("--device", help="cpu or cuda (default: olive-builder.json's, else cpu)")
    parser.add_argument("--text", help="a local UTF-8 text file instead of the committed text")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--adapter", metavar="NAME", help="evaluate the finetuned model of this adapter")
    parser.add_argument("--adapter-file", metavar="FILE",
                        help="its .onnx_adapter (default: MODEL_DIR/adapters/NAME.onnx_adapter)")
    parser.add_argument("--peft", metavar="DIR", help="its PEFT adapter folder (the source side, with --against)")
    parser.add_argument("--merged", action="store_true", help="the adapter is merged into the built model's weights")
    parser.add_argument("--json", action="store_true", help="print the record as JSON")
    parser.add_argument("--record-line", action="store_true", help=argparse.SUPPRESS)  # for evaluate_in_image
    args = parser.parse_args(argv)
    model_dir = Path(args.model_dir)
    adapter = None
    if args.adapter:
        onnx_adapter = None if args.merged else Path(args.adapter_file or model_dir / "adapters" /
                                                     f"{args.adapter}.onnx_adapter")
        adapter = AdapterUnderTest(args.adapter, Path(args.peft) if args.peft else None, onnx_adapter)
    info: dict[str, Any] = {}
    try:
        info = json.loads((model_dir / "olive-builder.json").read_text())
    except (OSError, ValueError):
        pass
    target = info.get("target") or {}
    try:
        result = evaluate(
            model_dir,
            args.against,
            precision=args.precision or target.get("precision"),
            device=args.device or target.get("device") or "cpu",
            settings=Settings(max_tokens=args.max_tokens, speed=not args.no_speed),
            text_path=args.text,
            on_progress=lambda m: print(f"==> evaluate: {m}", file=sys.stderr),
            adapter=adapter,
        )
    except BuilderError as e:
        print(f"Error: {e}", file=sys.stderr)
        return e.exit_code
    data = result.to_json()
    if args.record_line:
        print(RECORD_PREFIX + json.dumps(data), flush=True)
        return 0
    print(json.dumps(data, indent=2) if args.json else format_table(data))
    if result.failures:
        print("\n" + "\n".join(f"gate failed: {f}" for f in result.failures), file=sys.stderr)
        return EvaluationError.exit_code
    return 0



if __name__ == "__main__":
    sys.exit(main())
