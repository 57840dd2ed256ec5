"""``segllm-jax``: the command-line entry point.

Errors we raise on purpose (:class:`SegLLMError`) are printed as one sentence with exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pathlib import Path

from segllm_jax.errors import InputError, SegLLMError


def _convert(args: argparse.Namespace) -> int:
    from segllm_jax_convert.convert import convert_checkpoint, convert_training_init

    init_sources = (args.llava, args.clip, args.hipie)
    if any(init_sources):
        if not all(init_sources) or len(args.paths) != 1:
            raise InputError("a training init needs --llava, --clip and --hipie, and one output folder.")
        dst = convert_training_init(args.llava, args.clip, args.hipie, args.paths[0], progress=not args.quiet)
        print(f"training init from {args.llava}, {args.clip}, {args.hipie} -> {dst}")
        return 0
    if len(args.paths) != 2:
        raise InputError("convert takes SRC and DST (or --llava/--clip/--hipie and DST).")
    src, dst = args.paths
    dst = convert_checkpoint(src, dst, kind=args.kind, param_dtype=args.dtype, vision_config=args.vision_config,
                             progress=not args.quiet)
    print(f"converted {src} -> {dst}")
    return 0


def _check_conversion(args: argparse.Namespace) -> int:
    from segllm_jax_convert.check import check_conversion

    report = check_conversion(args.src, args.dst, seed=args.seed)
    print(report.table())
    return 0 if report.passed else 1


def _chat(args: argparse.Namespace) -> int:
    from segllm_jax.chat import run_chat
    from segllm_jax.checkpoint import load

    loaded = load(args.checkpoint)
    if args.script:
        try:
            stream = open(args.script, encoding="utf-8")
        except OSError as e:
            raise InputError(f"cannot read the script {args.script}: {e.strerror}.") from None
        with stream:
            failures = run_chat(loaded, args.image, stream, Path(args.out), interactive=False, mode=args.mode)
        return 1 if failures else 0
    run_chat(loaded, args.image, sys.stdin, Path(args.out), interactive=True, mode=args.mode)
    return 0


def _infer(args: argparse.Namespace) -> int:
    from segllm_jax.checkpoint import load
    from segllm_jax.infer import run_infer

    results = run_infer(load(args.checkpoint), args.manifest, args.out, batch_size=args.batch_size)
    failed = [r for r in results if r["error"]]
    for r in failed:
        print(f"{r['id']}: {r['error']}", file=sys.stderr)
    print(f"{len(results) - len(failed)}/{len(results)} conversations done -> {Path(args.out) / 'results.json'}")
    return 1 if failed else 0


def _eval(args: argparse.Namespace) -> int:
    from segllm_jax.checkpoint import load
    from segllm_jax.eval.evaluate import run_eval

    modes = ["teacher", "autoregressive"] if args.mode == "both" else [args.mode]
    results = run_eval(load(args.checkpoint), args.data, args.out, modes, ablate_memory=args.ablate_memory,
                       limit=args.limit)
    for name, metrics in results.items():
        print(f"### {name}\n\n{metrics.markdown()}\n")
    print(f"written: {Path(args.out) / 'metrics.json'}, metrics.md, iou_per_round.png")
    return 0


def _make_mrshapes(args: argparse.Namespace) -> int:
    from segllm_jax.data import mrshapes

    sizes = {"train": args.train, "val": args.val, "test": args.test}
    if args.tfds:  # first: it refuses a folder prepared with other parameters before any JSON is replaced
        from segllm_jax.data.tfds_sources import write_mrshapes

        print(f"TFDS (array_record): {write_mrshapes(Path(args.out) / 'tfds', sizes, args.seed, args.max_rounds)}")
    for split, files in mrshapes.write_splits(args.out, sizes, args.seed, args.max_rounds).items():
        print(f"{split}: {sizes[split]} conversations -> {files.conversations}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from segllm_jax.demo import run_demo

    run_demo(args.out, seed=args.seed, checkpoint_dir=args.checkpoint)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from segllm_jax.web_demo import serve

    return serve(args.checkpoint, host=args.host, port=args.port, mode=args.mode, max_upload_mb=args.max_upload_mb,
                 idle_timeout_s=args.idle_timeout, max_sessions=args.max_sessions, warmup=not args.no_warmup)


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from segllm_jax.train.loop import load_config, train

    config = load_config(args.config)
    if args.steps is not None:
        config = dataclasses.replace(config, steps=args.steps)
    records = train(config, args.workdir)
    if records:
        print(f"trained to step {records[-1]['step'] + 1}: loss {records[-1]['loss']:.4f} -> {args.workdir}")
    else:
        print(f"nothing to do: {args.workdir} is already at step {config.steps}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segllm-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a PyTorch/HF checkpoint to a segllm-jax checkpoint")
    p.add_argument("paths", nargs="+", metavar="SRC DST",
                   help="checkpoint folder or file (.safetensors, .bin, .pth), then the output folder")
    p.add_argument("--kind", default=None, help="source kind, if it cannot be detected")
    p.add_argument("--vision-config", default=None, help="CLIP config.json, for a SegLLM release whose tower "
                   "is not ViT-L/14")
    p.add_argument("--llava", default=None, help="training init: LLaVA-1.5 folder")
    p.add_argument("--clip", default=None, help="training init: CLIP ViT folder")
    p.add_argument("--hipie", default=None, help="training init: HIPIE r50_parts.pth")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="parameter dtype")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_convert)

    p = sub.add_parser("check-conversion", help="compare a converted checkpoint with the PyTorch original")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_check_conversion)

    p = sub.add_parser("chat", help="multi-round segmentation of an image, interactive or scripted")
    p.add_argument("--checkpoint", required=True, help="converted segllm-jax checkpoint folder")
    p.add_argument("--image", default=None, help="image to start with (asked for if absent)")
    p.add_argument("--script", default=None, help="file with one query per line (non-interactive)")
    p.add_argument("--out", default="chat_out", help="where overlays, masks and results.json go")
    p.add_argument("--mode", default="incremental", choices=["incremental", "recompute"])
    p.set_defaults(run=_chat)

    p = sub.add_parser("infer", help="batched inference over a manifest of images x conversations")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--manifest", required=True, help='JSON lines: {"image": PATH, "queries": [...]}')
    p.add_argument("--out", default="infer_out")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(run=_infer)

    p = sub.add_parser("serve", help="multi-round segmentation in the browser (needs the `demo` extra: Gradio)")
    p.add_argument("--checkpoint", required=True, help="converted segllm-jax checkpoint folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default loopback only; e.g. 0.0.0.0 exposes the demo to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--mode", default="incremental", choices=["incremental", "recompute"])
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image file accepted")
    p.add_argument("--idle-timeout", type=float, default=1800.0, help="seconds before an idle session is released")
    p.add_argument("--max-sessions", type=int, default=16, help="browser sessions held at once")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling the model before serving")
    p.set_defaults(run=_serve)

    p = sub.add_parser("train", help="train (or resume) SegLLM from a config file")
    p.add_argument("--config", required=True, help="Python file defining CONFIG = TrainConfig(...)")
    p.add_argument("--workdir", required=True, help="checkpoints and metrics; rerun to resume")
    p.add_argument("--steps", type=int, default=None, help="override the config's step count")
    p.set_defaults(run=_train)

    p = sub.add_parser("eval", help="per-round gIoU / cIoU / P@0.5 on conversation data")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="mrshapes:DIR:SPLIT, or a JSON file naming conversations, "
                   "registers and images_root")
    p.add_argument("--out", default="eval_out")
    p.add_argument("--mode", default="both", choices=["teacher", "autoregressive", "both"])
    p.add_argument("--ablate-memory", action="store_true", help="also evaluate with the [REF] embeddings zeroed")
    p.add_argument("--limit", type=int, default=None, help="first N conversations of each file")
    p.set_defaults(run=_eval)

    p = sub.add_parser("make-mrshapes", help="generate MR-Shapes splits (conversation JSON, optionally TFDS)")
    p.add_argument("--out", required=True, help="folder for images/, annotations/, conversations/ (and tfds/)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same files")
    p.add_argument("--train", type=int, default=1000, help="scenes (one conversation each) in the train split")
    p.add_argument("--val", "--validation", dest="val", type=int, default=100, help="scenes in the val split")
    p.add_argument("--test", type=int, default=100, help="scenes in the test split")
    p.add_argument("--max-rounds", type=int, default=6, help="rounds per conversation, at most")
    p.add_argument("--tfds", action="store_true", help="also write OUT/tfds/mrshapes/<version> (array_record; "
                   "val is TFDS's 'validation' split)")
    p.set_defaults(run=_make_mrshapes)

    p = sub.add_parser("demo", help="the trained tiny model on a 4-round MR-Shapes conversation (the README's "
                                    "first command)")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--seed", type=int, default=7, help="MR-Shapes seed of the test scene")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped checkpoints/tiny_mrshapes)")
    p.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("absl", "orbax", "jax"):  # checkpoint-library chatter is not for people
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.run(args)
    except SegLLMError as e:
        if args.debug:
            raise
        print(f"segllm-jax {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
