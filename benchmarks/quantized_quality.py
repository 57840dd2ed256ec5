"""Quality of weight-only quantized inference (int8 / int4 through qwix) against the float model, on CPU.

Measured on the golden SegLLM (tiny LLaMA + tiny CLIP + full HIPIE, ``../shared/golden/segllm``, seed 0,
weights rebuilt from its recipe and converted by the real converter) and its 3-round conversation:

* **KL**: per-token KL(float || variant) of the LLM's next-token distributions over every token of the
  whole 3-round conversation (image and reference features included), all variants fed the float
  session's conversation and reference products; mean and max over tokens.
* **IoU**: each variant runs its own 3-round session; IoU of its mask against the float session's mask
  of the same round (in HIPIE's frame).

Variants: ``bf16`` (float weights, bfloat16 activations: the activation part of the error alone),
``int8`` and ``int4`` (``segllm_jax.load(DIR, quantize=...)``: LLM Linears quantized, activations bf16),
and the same with the CLIP tower quantized too (``+clip``).

``--trained`` asks the same of a *trained* checkpoint (default: the learning proof's shipped
``checkpoints/tiny_mrshapes``): each variant answers the conversations of MR-Shapes test scenes (autoregressive
references, its own session), and each round's mask is compared with the float session's. A random-weight
model's answer can hinge on a near-tie between HIPIE's queries; a trained one shows whether quantization moves
answers in practice.

    python benchmarks/quantized_quality.py            # prints the markdown table (docs/memory.md)
    python benchmarks/quantized_quality.py --trained  # the trained-checkpoint table
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO.parent / "shared" / "images" / "wii.jpg"

# (name, weight qtype or None, CLIP quantized too, activation dtype)
VARIANTS = (
    ("bf16 activations", None, False, "bfloat16"),
    ("int8", "int8", False, "bfloat16"),
    ("int8 +clip", "int8", True, "bfloat16"),
    ("int4", "int4", False, "bfloat16"),
    ("int4 +clip", "int4", True, "bfloat16"),
    ("int8, f32 activations", "int8", False, "float32"),
    ("int4, f32 activations", "int4", False, "float32"),
)


def golden_checkpoint(work: Path, seed: int = 0) -> tuple[Path, np.lib.npyio.NpzFile]:
    """The golden SegLLM of ``seed`` converted under ``work``, and its golden arrays (the test fixtures' recipe)."""
    sys.path.insert(0, str(REPO / "tests"))
    from segllm.conftest import golden_segllm_dir, write_release_folder

    from segllm_jax_convert.convert import convert_checkpoint

    golden = np.load(golden_segllm_dir() / f"seed{seed}_wii_3rounds.npz")
    converted = work / "converted"
    if not (converted / "config.json").exists():
        release = write_release_folder(work / "release", seed)
        convert_checkpoint(release, converted, progress=False,
                           vision_config=golden_segllm_dir() / "clip_vision_config.json")
    return converted, golden


def load_variant(directory: Path, qtype: str | None, vision: bool, dtype: str):
    """The checkpoint with the LLM (and CLIP, with ``vision``) computing in ``dtype``, its weights quantized to
    ``qtype`` (None: float). ``segllm_jax.load(DIR, quantize=q, quantize_vision=v)`` is the bfloat16 case."""
    import dataclasses

    import segllm_jax
    from segllm_jax import checkpoint, quantize

    loaded = segllm_jax.load(directory)
    kind, config = checkpoint.read_config(directory)
    config = quantize.quantized_config(kind, config, vision=vision, dtype=dtype)
    model = checkpoint.restore_arrays(directory, checkpoint.build_model(kind, config, abstract=True))
    if qtype is not None:
        model = quantize.quantize_model(kind, model, qtype, vision=vision)
    return dataclasses.replace(loaded, config=config, model=model)


def golden_logits(loaded, golden, image: Path = IMAGE) -> np.ndarray:
    """``loaded``'s next-token logits ``[T, V]`` over the golden conversation (all rounds, teacher-forced, the
    batch path of ``segllm_jax.batch``), its references fed the golden crops and boxes (the same for every
    model, so only the LLM / CLIP weights differ)."""
    from segllm_jax import batch as batching
    from segllm_jax.prompt import ConversationEncoder, EncodedConversation
    from segllm_jax.session import ImageContext, next_round

    cfg = loaded.model.cfg
    encoder = ConversationEncoder(loaded.tokenizer, cfg.num_image_tokens)
    conversation, refs = EncodedConversation.empty(), []
    for text in golden["round_texts"]:
        conversation, _, cited = next_round(encoder, conversation, str(text), cfg.context_length)
        refs.append([batching.Reference(golden[f"r{k}_out_mask_encode_crop"].transpose(1, 2, 0),
                                        golden[f"r{k}_out_box_encode"]) for k in cited])
    clip = ImageContext.prepare(image, cfg).clip_pixels[None]
    data = batching.collate([conversation], clip, [0], [refs], gate=cfg.eval_reference_gate)
    out, _ = nnx.jit(batching.forward)(loaded.model, data)
    return np.asarray(out.logits[0])


def kl_per_token(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) of each row's softmax, in nats."""
    logp = jax.nn.log_softmax(jnp.asarray(p_logits, jnp.float32), -1)
    logq = jax.nn.log_softmax(jnp.asarray(q_logits, jnp.float32), -1)
    return np.asarray(jnp.sum(jnp.exp(logp) * (logp - logq), -1))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))


def segllm_jax_load(directory: Path):
    import segllm_jax

    return segllm_jax.load(directory)


def run_session(loaded, texts, image: Path = IMAGE):
    from segllm_jax.session import MultiRoundSession

    session = MultiRoundSession(loaded, image)
    for text in texts:
        session.ask(text)
    return session


def measure(directory: Path, golden, variants=VARIANTS, *, sessions: bool = True) -> list[dict]:
    """One row per variant: KL mean / max over the conversation's tokens and (``sessions``) each round's
    mask IoU against the float session's."""
    texts = [str(t) for t in golden["round_texts"]]
    float_loaded = segllm_jax_load(directory)
    float_logits = golden_logits(float_loaded, golden)
    float_session = run_session(float_loaded, texts) if sessions else None
    rows = []
    for name, *how in variants:
        loaded = load_variant(directory, *how)
        kl = kl_per_token(float_logits, golden_logits(loaded, golden))
        row = dict(name=name, kl_mean=float(kl.mean()), kl_max=float(kl.max()), tokens=kl.size)
        if sessions:
            pairs = list(zip(run_session(loaded, texts).rounds, float_session.rounds, strict=True))
            row["ious"] = [iou(r.mask_frame, f.mask_frame) for r, f in pairs]
            row["scores"] = [(round(r.score, 4), round(f.score, 4)) for r, f in pairs]
        rows.append(row)
    return rows


def measure_trained(directory: Path, scenes: int, seed: int, variants=VARIANTS[1:5]) -> list[dict]:
    """One row per variant: every round's mask IoU against the float session's, over the conversations of the
    first ``scenes`` MR-Shapes test scenes of ``seed`` (each variant its own autoregressive session)."""
    from PIL import Image

    from segllm_jax.data import mrshapes

    float_loaded = segllm_jax_load(directory)
    per_variant = {name: [] for name, *_ in variants}
    loaded = {name: load_variant(directory, *how) for name, *how in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(scenes):
            scene, conversation = mrshapes.scene_and_conversation(seed, "test", index, max_rounds=6)
            image = Path(tmp) / f"scene_{index}.png"
            Image.fromarray(scene.image).save(image)
            texts = [r.tagged_question for r in conversation.rounds]
            reference = run_session(float_loaded, texts, image).rounds
            for name, model in loaded.items():
                pairs = zip(run_session(model, texts, image).rounds, reference, strict=True)
                per_variant[name] += [iou(r.mask_frame, f.mask_frame) for r, f in pairs]
            print(f"scene {index + 1}/{scenes}: {len(texts)} rounds", file=sys.stderr, flush=True)
    rows = []
    for name, ious in per_variant.items():
        ious = np.asarray(ious)
        rows.append(dict(name=name, rounds=ious.size, mean=float(ious.mean()), min=float(ious.min()),
                         share_099=float((ious >= 0.99).mean())))
    return rows


def print_table(title: str, columns: list[str], cells: list[list[str]]) -> None:
    print(f"{title}, CPU (jax {jax.__version__})\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in cells:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=None, help="names from VARIANTS (default: all; with "
                        "--trained: the four bf16-activation ones)")
    parser.add_argument("--trained", nargs="?", const=REPO / "checkpoints" / "tiny_mrshapes", type=Path,
                        default=None, metavar="DIR", help="measure a trained checkpoint on MR-Shapes test scenes "
                        "(default DIR: the shipped tiny_mrshapes) instead of the golden model")
    parser.add_argument("--scenes", type=int, default=40, help="with --trained: how many test scenes")
    parser.add_argument("--seed", type=int, default=4242, help="with --trained: the MR-Shapes seed of the scenes")
    args = parser.parse_args()
    variants = [v for v in VARIANTS if args.variants is None or v[0] in args.variants]
    if args.trained is not None:
        rows = measure_trained(args.trained, args.scenes, args.seed, variants if args.variants else VARIANTS[1:5])
        print_table(f"Trained checkpoint {args.trained.name}, MR-Shapes test scenes 0-{args.scenes - 1} of seed "
                    f"{args.seed}, {rows[0]['rounds']} rounds, autoregressive",
                    ["variant", "mask IoU vs float: mean", "min", "rounds with IoU >= 0.99"],
                    [[r["name"], f"{r['mean']:.4f}", f"{r['min']:.4f}", f"{100 * r['share_099']:.1f} %"]
                     for r in rows])
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory, golden = golden_checkpoint(Path(tmp))
        rows = measure(directory, golden, variants)
    print_table(f"Golden SegLLM seed 0, {len(golden['round_texts'])}-round conversation, {rows[0]['tokens']} tokens",
                ["variant", "KL mean (nats/token)", "KL max", "mask IoU vs float, per round"],
                [[r["name"], f"{r['kl_mean']:.2e}", f"{r['kl_max']:.2e}", " / ".join(f"{v:.4f}" for v in r["ious"])]
                 for r in rows])


if __name__ == "__main__":
    main()
