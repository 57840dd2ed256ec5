"""``segllm-jax``: the command-line entry point.

The error policy, applied to every subcommand:

* a user mistake is one sentence on stderr, ``segllm-jax <command>: ...``, and exit code 2; nothing
  the user owns is changed and no partial output is left under a final name. ``--debug`` shows the
  traceback instead. Argument mistakes are caught by the parser (types in :mod:`.cli_args`) and cheap input
  checks (files, folders, ports, checkpoint folders, manifests) run before any model loads;
* batch commands (``infer``, ``eval``, ``chat --script``) record a failing item (with its id) and
  go on; their exit code is 1 when any item failed, 0 otherwise;
* nothing reaches a model hub: the hub libraries' offline switches are set at start-up.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

from segllm_jax.apps.cli_args import (
    PORT,
    Parser,
    check_port_is_free,
    check_segllm_checkpoint,
    existing_file,
    existing_path,
    non_negative_int,
    positive_float,
    positive_int,
    read_script,
)
from segllm_jax.errors import InputError, SegLLMError

# Set before any hub library is imported: every model, tokenizer and config is read from local folders.
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "GRADIO_ANALYTICS_ENABLED": "False",
    "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
}


def go_offline() -> None:
    """Process-wide offline switches and quiet libraries (the CLI owns its process; a library user's
    process is left alone, and the library itself only ever opens local folders)."""
    os.environ.update(OFFLINE_ENVIRONMENT)
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecations are not for users
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*DecompressionBomb.*")  # our own pixel limit says it better
    try:
        from PIL import Image

        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    except ImportError:  # pragma: no cover - PIL is a dependency
        pass


def _convert(args: argparse.Namespace) -> int:
    from segllm_jax.outputs import check_destination

    init_sources = (args.llava, args.clip, args.hipie)
    if any(init_sources):
        if not all(init_sources) or len(args.paths) != 1:
            raise InputError("a training init needs --llava, --clip and --hipie, and one output folder.")
        check_destination(args.paths[0], init_sources, args.overwrite)
        from segllm_jax_convert.convert import convert_training_init

        dst = convert_training_init(args.llava, args.clip, args.hipie, args.paths[0], progress=not args.quiet,
                                    overwrite=args.overwrite)
        print(f"training init from {args.llava}, {args.clip}, {args.hipie} -> {dst}")
        return 0
    if len(args.paths) != 2:
        raise InputError("convert takes SRC and DST (or --llava/--clip/--hipie and DST).")
    src, dst = args.paths
    if not Path(src).exists():
        raise InputError(f"{src}: no such file or folder; pass a checkpoint folder or a .safetensors, .bin or "
                         ".pth file.")
    check_destination(dst, [src] + ([args.vision_config] if args.vision_config else []), args.overwrite)
    from segllm_jax_convert.convert import convert_checkpoint

    dst = convert_checkpoint(src, dst, kind=args.kind, param_dtype=args.dtype, vision_config=args.vision_config,
                             progress=not args.quiet, overwrite=args.overwrite)
    print(f"converted {src} -> {dst}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from segllm_jax import checkpoint_folder
    from segllm_jax_convert.export import check_output

    checkpoint_folder.inspect(args.checkpoint, kinds=("segllm",))  # before anything is read or written
    check_output(args.out, [args.checkpoint] + ([args.like] if args.like else []))
    from segllm_jax_convert.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, part=args.part, dtype=args.dtype, like=args.like,
                            max_shard_bytes=args.max_shard_mb * 10**6)
    print(f"exported {args.checkpoint} ({args.part}) -> {out}")
    return 0


def _check_conversion(args: argparse.Namespace) -> int:
    from segllm_jax import checkpoint_folder

    if not Path(args.src).exists():  # never a hub id: a mistyped path is just that
        raise InputError(f"{args.src}: no such file or folder; pass the PyTorch checkpoint that was converted.")
    checkpoint_folder.inspect(args.dst)
    from segllm_jax_convert.check import check_conversion

    report = check_conversion(args.src, args.dst, seed=args.seed)
    print(report.table())
    return 0 if report.passed else 1


def _load(args: argparse.Namespace):
    """The checkpoint of ``--checkpoint``, quantized as ``--quantize`` / ``--quantize-vision`` ask."""
    from segllm_jax.checkpoint import load

    return load(args.checkpoint, quantize=args.quantize, quantize_vision=args.quantize_vision)


def add_quantize_options(p: argparse.ArgumentParser) -> None:
    from segllm_jax.quantize import QTYPES

    p.add_argument("--quantize", default=None, choices=QTYPES,
                   help="weight-only quantization of the LLM through qwix, activations in bfloat16 (docs/memory.md)")
    p.add_argument("--quantize-vision", action="store_true", help="with --quantize: quantize the CLIP tower too")


def _chat(args: argparse.Namespace) -> int:
    from segllm_jax import preprocess
    from segllm_jax.outputs import check_output_folder

    if args.script and not args.image:
        raise InputError("--script needs --image (the picture the script's questions are about).")
    check_segllm_checkpoint(args.checkpoint)
    if args.image:
        preprocess.load_image(args.image)  # a bad picture is refused before the model loads
    lines = read_script(args.script) if args.script else None
    check_output_folder(args.out)

    import io

    from segllm_jax.apps.chat import run_chat

    loaded = _load(args)
    if lines is not None:
        failures = run_chat(loaded, args.image, io.StringIO("\n".join(lines) + "\n"), Path(args.out),
                            interactive=False, mode=args.mode)
        return 1 if failures else 0
    stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace") if hasattr(sys.stdin, "buffer") \
        else sys.stdin
    run_chat(loaded, args.image, stdin, Path(args.out), interactive=True, mode=args.mode)
    return 0


def _infer(args: argparse.Namespace) -> int:
    from segllm_jax.manifest import read_manifest
    from segllm_jax.outputs import check_output_folder

    check_segllm_checkpoint(args.checkpoint)
    read_manifest(args.manifest)  # every line checked before the model loads
    check_output_folder(args.out)
    from segllm_jax.apps.infer import run_infer

    results = run_infer(_load(args), args.manifest, args.out, batch_size=args.batch_size)
    failed = [r for r in results if r["error"]]
    return _batch_end(failed, f"{len(results) - len(failed)}/{len(results)} conversations done -> "
                              f"{Path(args.out) / 'results.json'}")


def _eval(args: argparse.Namespace) -> int:
    from segllm_jax.eval.data_spec import EvalData
    from segllm_jax.outputs import check_output_folder

    check_segllm_checkpoint(args.checkpoint)
    EvalData.parse(args.data).check()  # files and folders exist before the model loads
    check_output_folder(args.out)
    from segllm_jax.checkpoint import load
    from segllm_jax.eval.evaluate import run_eval

    modes = ["teacher", "autoregressive"] if args.mode == "both" else [args.mode]
    results, failures = run_eval(load(args.checkpoint), args.data, args.out, modes,
                                 ablate_memory=args.ablate_memory, limit=args.limit, best_query=args.best_query)
    for name, metrics in results.items():
        print(f"### {name}\n\n{metrics.markdown()}\n")
    return _batch_end(failures, f"written: {Path(args.out) / 'metrics.json'}, metrics.md, iou_per_round.png")


def _batch_end(failures: list[dict], summary: str) -> int:
    """A batch command's last words: every failed item on stderr (``ID: error``), then ``summary``; the exit
    code is 1 when an item failed (the error policy above)."""
    for failure in failures:
        print(f"{failure['id']}: {failure['error']}", file=sys.stderr)
    print(summary)
    return 1 if failures else 0


def _make_mrshapes(args: argparse.Namespace) -> int:
    from segllm_jax.outputs import check_output_folder

    check_output_folder(args.out)
    from segllm_jax.data import mrshapes

    sizes = {"train": args.train, "val": args.val, "test": args.test}
    if args.tfds:  # first: it refuses a folder prepared with other parameters before any JSON is replaced
        from segllm_jax.data.tfds_sources import write_mrshapes

        print(f"TFDS (array_record): {write_mrshapes(Path(args.out) / 'tfds', sizes, args.seed, args.max_rounds)}")
    for split, files in mrshapes.write_splits(args.out, sizes, args.seed, args.max_rounds).items():
        print(f"{split}: {sizes[split]} conversations -> {files.conversations}")
    return 0


def _make_conversations(args: argparse.Namespace) -> int:
    from segllm_jax.data.coco_conversations import CocoOptions, write_conversations
    from segllm_jax.outputs import check_destination

    if not Path(args.images).is_dir():
        raise InputError(f"--images {args.images} is not a folder; pass the folder the COCO file's file_name "
                         "paths are relative to.")
    options = CocoOptions(rounds=args.rounds, per_image=args.per_image, seed=args.seed, name=args.name)
    check_destination(args.out, [args.coco, args.images], args.overwrite)
    files = write_conversations(args.coco, args.images, args.out, options, progress=not args.quiet)
    print(files.summary)
    print(f"next: SEGLLM_DATA={files.out} segllm-jax train --config configs/fine_tune.py ..., or "
          f"segllm-jax eval --data {files.data} ... (docs/fine_tuning.md)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from segllm_jax.outputs import check_output_folder

    if args.checkpoint is not None:
        check_segllm_checkpoint(args.checkpoint)
    check_output_folder(args.out)
    from segllm_jax.apps.demo import run_demo

    run_demo(args.out, seed=args.seed, checkpoint_dir=args.checkpoint)
    return 0


def _serve(args: argparse.Namespace) -> int:
    check_port_is_free(args.host, args.port)  # before minutes of model loading, not after
    check_segllm_checkpoint(args.checkpoint)
    from segllm_jax.apps.web_demo import require_gradio, serve

    require_gradio()
    return serve(args.checkpoint, host=args.host, port=args.port, mode=args.mode, max_upload_mb=args.max_upload_mb,
                 idle_timeout_s=args.idle_timeout, max_sessions=args.max_sessions, warmup=not args.no_warmup,
                 quantize=args.quantize, quantize_vision=args.quantize_vision)


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from segllm_jax.errors import ConfigError

    try:  # a syntax error in the config file is the user's, not ours: say where it is
        compile(Path(args.config).read_bytes(), args.config, "exec")
    except SyntaxError as e:
        raise ConfigError(f"{args.config}, line {e.lineno}: {e.msg}; fix the config file.") from None
    except ValueError:
        raise ConfigError(f"{args.config} is not a Python file (it holds NUL bytes).") from None
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


def _merge_lora(args: argparse.Namespace) -> int:
    from segllm_jax.train.lora import merge_to_folder

    out = merge_to_folder(args.checkpoint, args.out, base=args.base, overwrite=args.overwrite)
    print(f"merged the LoRA adapters of {args.checkpoint} into {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="segllm-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-sentence errors")
    common = argparse.ArgumentParser(add_help=False)  # --debug also after the subcommand
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, parents=[common])
        p.set_defaults(run=run)
        return p

    p = command("convert", _convert, "convert a PyTorch/HF checkpoint to a segllm-jax checkpoint")
    p.add_argument("paths", nargs="+", metavar="SRC DST",
                   help="checkpoint folder or file (.safetensors, .bin, .pth), then the output folder")
    p.add_argument("--kind", default=None, help="source kind, if it cannot be detected")
    p.add_argument("--vision-config", default=None, type=existing_file,
                   help="CLIP config.json, for a SegLLM release whose tower is not ViT-L/14")
    p.add_argument("--llava", default=None, type=existing_path, help="training init: LLaVA-1.5 folder")
    p.add_argument("--clip", default=None, type=existing_path, help="training init: CLIP ViT folder")
    p.add_argument("--hipie", default=None, type=existing_file, help="training init: HIPIE r50_parts.pth")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="parameter dtype")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty DST (written aside, swapped in only when complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("export", _export, "write a segllm-jax checkpoint back in the PyTorch release layout")
    p.add_argument("checkpoint", metavar="CKPT", help="a segllm-jax SegLLM checkpoint folder (converted or trained)")
    p.add_argument("out", metavar="OUT", help="the new output folder (must not exist)")
    p.add_argument("--part", default="segllm", choices=["segllm", "llm", "clip", "hipie"],
                   help="segllm: the release folder; llm: a transformers LLaMA; clip: a CLIP vision tower; "
                        "hipie: r50_parts.pth")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="floating tensors' dtype (default: as stored)")
    p.add_argument("--like", default=None, type=existing_path,
                   help="the PyTorch checkpoint it came from: supplies the keys the converter ignores")
    p.add_argument("--max-shard-mb", type=positive_int(10**6), default=5000, help="largest safetensors shard")

    p = command("check-conversion", _check_conversion, "compare a converted checkpoint with the PyTorch original")
    p.add_argument("src", help="the PyTorch checkpoint folder (local; never downloaded)")
    p.add_argument("dst", help="the converted segllm-jax folder")
    p.add_argument("--seed", type=non_negative_int(), default=0)

    p = command("chat", _chat, "multi-round segmentation of an image, interactive or scripted")
    p.add_argument("--checkpoint", required=True, help="converted segllm-jax checkpoint folder")
    p.add_argument("--image", default=None, type=existing_file, help="image to start with (asked for if absent)")
    p.add_argument("--script", default=None, type=existing_file,
                   help="UTF-8 file with one query per line (non-interactive; needs --image)")
    p.add_argument("--out", default="chat_out", help="where overlays, masks and results.json go")
    p.add_argument("--mode", default="incremental", choices=["incremental", "recompute"])
    add_quantize_options(p)

    p = command("infer", _infer, "batched inference over a manifest of images x conversations")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--manifest", required=True, type=existing_file,
                   help='JSON lines: {"image": PATH, "queries": [...], "id": NAME (optional)}')
    p.add_argument("--out", default="infer_out")
    p.add_argument("--batch-size", type=positive_int(1024), default=8)
    add_quantize_options(p)

    p = command("serve", _serve, "multi-round segmentation in the browser (needs the `demo` extra: Gradio)")
    p.add_argument("--checkpoint", required=True, help="converted segllm-jax checkpoint folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default loopback only; e.g. 0.0.0.0 exposes the demo to the network)")
    p.add_argument("--port", type=PORT, default=7860)
    p.add_argument("--mode", default="incremental", choices=["incremental", "recompute"])
    p.add_argument("--max-upload-mb", type=positive_float(1024), default=20.0, help="largest image file accepted")
    p.add_argument("--idle-timeout", type=positive_float(7 * 24 * 3600), default=1800.0,
                   help="seconds before an idle session is released")
    p.add_argument("--max-sessions", type=positive_int(1024), default=16, help="browser sessions held at once")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling the model before serving")
    add_quantize_options(p)

    p = command("train", _train, "train (or resume) SegLLM from a config file")
    p.add_argument("--config", required=True, type=existing_file, help="Python file defining CONFIG = TrainConfig(...)")
    p.add_argument("--workdir", required=True, help="checkpoints and metrics; rerun to resume")
    p.add_argument("--steps", type=positive_int(), default=None, help="override the config's step count")

    p = command("merge-lora", _merge_lora, "merge a LoRA run's adapters into a plain model folder")
    p.add_argument("--checkpoint", required=True, type=existing_path,
                   help="a LoRA training workdir (its adapters/) or an adapters folder")
    p.add_argument("--base", default=None, type=existing_path,
                   help="the base model folder (default: the run's init_checkpoint)")
    p.add_argument("--out", required=True, help="the merged model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (swapped in when complete)")

    p = command("eval", _eval, "per-round gIoU / cIoU / P@0.5 on conversation data")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="mrshapes:DIR:SPLIT, or a JSON file naming conversations, "
                   "registers and images_root")
    p.add_argument("--out", default="eval_out")
    p.add_argument("--mode", default="both", choices=["teacher", "autoregressive", "both"])
    p.add_argument("--ablate-memory", action="store_true", help="also evaluate with the [REF] embeddings zeroed")
    p.add_argument("--best-query", action="store_true",
                   help="also score the query that overlaps the ground truth best (diagnosis: choice vs. mask errors)")
    p.add_argument("--limit", type=positive_int(), default=None, help="first N conversations of each file")

    p = command("make-mrshapes", _make_mrshapes, "generate MR-Shapes splits (conversation JSON, optionally TFDS)")
    p.add_argument("--out", required=True, help="folder for images/, annotations/, conversations/ (and tfds/)")
    p.add_argument("--seed", type=non_negative_int(), default=0, help="the same seed gives the same files")
    p.add_argument("--train", type=non_negative_int(10**7), default=1000,
                   help="scenes (one conversation each) in the train split")
    p.add_argument("--val", "--validation", dest="val", type=non_negative_int(10**7), default=100,
                   help="scenes in the val split")
    p.add_argument("--test", type=non_negative_int(10**7), default=100, help="scenes in the test split")
    p.add_argument("--max-rounds", type=positive_int(64), default=6, help="rounds per conversation, at most")
    p.add_argument("--tfds", action="store_true", help="also write OUT/tfds/mrshapes/<version> (array_record; "
                   "val is TFDS's 'validation' split)")

    p = command("make-conversations", _make_conversations,
                "referring conversations (JSON + annotation register) from COCO-format instance annotations")
    p.add_argument("--coco", required=True, type=existing_file,
                   help="COCO instances JSON (polygons or RLE; optional RefCOCO-style 'refs')")
    p.add_argument("--images", required=True, type=existing_path, help="the folder its file_name paths are under")
    p.add_argument("--out", required=True, help="new folder for conversations/, annotations/, data.json, report.json")
    p.add_argument("--rounds", type=positive_int(64), default=4, help="rounds per conversation, at most")
    p.add_argument("--per-image", type=positive_int(1000), default=1, help="conversations drawn per image")
    p.add_argument("--seed", type=non_negative_int(), default=0, help="the same file and seed give the same files")
    p.add_argument("--name", default="coco_conversations", help="dataset name in the placeholders and file names")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty OUT (written aside, swapped in only when complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("demo", _demo, "the trained tiny model on a 4-round MR-Shapes conversation (the README's first "
                               "command)")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--seed", type=non_negative_int(), default=7, help="MR-Shapes seed of the test scene")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint folder (default: the shipped checkpoints/tiny_mrshapes)")
    return parser


def main(argv: list[str] | None = None) -> int:
    go_offline()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # library chatter is not for people: a problem we can name is our one sentence, the rest are bugs
    for noisy in ("absl", "orbax", "jax", "httpx", "transformers", "gradio", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.run(args)
    except SegLLMError as e:
        if args.debug:
            raise
        print(f"segllm-jax {args.command}: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"segllm-jax {args.command}: interrupted; finished outputs are complete, nothing is half-written.",
              file=sys.stderr)
        return 130


def one_line(message: str) -> str:
    """An error as one line: a message quoting a file's text must not spill over several lines."""
    return " ".join(message.split())


if __name__ == "__main__":
    sys.exit(main())
