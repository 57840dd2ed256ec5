"""``segllm-jax``: the command-line entry point.

Errors we raise on purpose (:class:`SegLLMError`) are printed as one sentence with exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys

from segllm_jax.errors import SegLLMError


def _convert(args: argparse.Namespace) -> int:
    from segllm_jax_convert.convert import convert_checkpoint

    dst = convert_checkpoint(args.src, args.dst, kind=args.kind, param_dtype=args.dtype,
                             progress=not args.quiet)
    print(f"converted {args.src} -> {dst}")
    return 0


def _check_conversion(args: argparse.Namespace) -> int:
    from segllm_jax_convert.check import check_conversion

    report = check_conversion(args.src, args.dst, seed=args.seed)
    print(report.table())
    return 0 if report.passed else 1


def _demo(args: argparse.Namespace) -> int:
    from segllm_jax.demo import run_demo

    run_demo(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segllm-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a PyTorch/HF checkpoint to a segllm-jax checkpoint")
    p.add_argument("src", help="checkpoint folder or file (.safetensors, .bin, .pth)")
    p.add_argument("dst", help="output folder")
    p.add_argument("--kind", default=None, help="source kind, if it cannot be detected")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="parameter dtype")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_convert)

    p = sub.add_parser("check-conversion", help="compare a converted checkpoint with the PyTorch original")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_check_conversion)

    p = sub.add_parser("demo", help="tiny end-to-end forward pass (the README's first command)")
    p.add_argument("--out", default="demo_out")
    p.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.run(args)
    except SegLLMError as e:
        if args.debug:
            raise
        print(f"segllm-jax {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
