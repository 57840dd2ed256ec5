"""One command for a GPU session: every GPU number the project lacks, in one markdown report.

    python benchmarks/gpu_suite.py                 # on an H100/H200: <= 8 minutes
    python benchmarks/gpu_suite.py --smoke         # the same code at tiny shapes on CPU (tests run this)
    python benchmarks/gpu_suite.py --only msda hipie --out report.md

A GPU is lent to us for minutes at a time, so everything is prepared here and nothing is decided
there.  Sections, in priority order (each one a subprocess with its own time cap, so a slow or
failing section costs only its cap and the report still gets written):

1. ``env``: device, nominal HBM bandwidth, versions, missing Python modules.
2. ``msda``: ``benchmarks/ms_deform_attn.py`` forward and forward+backward at the encoder size
   (1024 px, B = 1) and decoder sizes (Q = 110 with B = 8, Q = 900 with B = 2), float32 and
   bfloat16, for the XLA path and the Pallas (Triton) kernel, then ``transformers``' PyTorch
   ``MultiScaleDeformableAttention`` on CUDA; milliseconds, achieved GB/s, % of the copy
   roofline and of the card's nominal bandwidth.
3. ``hipie``: ``benchmarks/hipie_forward.py`` at 1024 px with 1 and 8 prompts.
4. ``multiround``: ``benchmarks/multiround.py --config 7b --rounds 8``: round latency with
   7B-shaped random bf16 weights, incremental (KV cache) vs recompute.
5. ``train``: ``benchmarks/train_step.py --preset llama1b``: step time and MFU.

The report ends with the issue's GPU targets checked against the numbers (Pallas forward >= 3x
the XLA path and >= 60 % of nominal bandwidth at the encoder size; round-8 KV-cache speed-up
>= 5x; llama1b MFU >= 40 %).  Default output: ``benchmarks/results/gpu_suite-<device>.md``.

Every subprocess runs from the repository root with ``PYTHONPATH`` set to it (no install needed)
and ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (JAX and PyTorch share the card in the msda section).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# (import name, distribution): what the sections import, beyond the standard library
MODULES = (("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"), ("optax", "optax"),
           ("orbax.checkpoint", "orbax-checkpoint"), ("torch", "torch"), ("transformers", "transformers"),
           ("tokenizers", "tokenizers"), ("sentencepiece", "sentencepiece"), ("safetensors", "safetensors"),
           ("grain", "grain"), ("scipy", "scipy"), ("PIL", "pillow"), ("tensorboardX", "tensorboardX"),
           ("pycocotools", "pycocotools"), ("tqdm", "tqdm"), ("ml_dtypes", "ml-dtypes"))
# Nominal HBM bandwidth (GB/s) by device-kind substring, most specific first.
NOMINAL_GBPS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100", 2039.0))


@dataclasses.dataclass(frozen=True)
class Step:
    """One subprocess of a section: its arguments and its time cap (seconds)."""

    title: str
    argv: list[str]
    cap_s: float


def nominal_gbps(device_kind: str) -> float | None:
    return next((gbps for key, gbps in NOMINAL_GBPS if key in device_kind), None)


def plan(smoke: bool, device_kind: str, tmp: Path) -> dict[str, list[Step]]:
    """The sections' subprocesses.  ``--smoke`` keeps every step and shrinks the shapes."""
    py = [sys.executable]
    peak = nominal_gbps(device_kind)
    peak_args = ["--peak-gbps", str(peak)] if peak else []
    if smoke:
        msda_common = ["--smoke", "--sizes", "enc_b1", "--warmup", "0", "--iters", "1"]  # compiles dominate
        kernel, torch_device = "xla_dense", "cpu"  # interpret-mode Pallas would only time the interpreter
    else:
        msda_common = ["--sizes", "enc_b1", "dec_q110_b8", "dec_q900", "--warmup", "2", "--iters", "10"]
        kernel, torch_device = "pallas", "cuda"
    msda_common += ["--dtype", "float32", "bfloat16", "--markdown", *peak_args]
    msda = [
        Step(f"XLA path and {kernel}", py + [str(BENCH / "ms_deform_attn.py"), *msda_common, "--impls", "xla", kernel,
                                             "--json", str(tmp / "msda.json")], 300 if smoke else 150),
        # its own process: the PyTorch allocator and XLA's share the card more simply that way
        Step(f"PyTorch peer ({torch_device})", py + [str(BENCH / "ms_deform_attn.py"), *msda_common, "--impls", "torch",
                                                     "--torch-device", torch_device], 300 if smoke else 50),
    ]
    hipie_args = ["--config", "tiny", "--size", "64", "--runs", "1", "--warmup", "0"] if smoke else ["--runs", "3"]
    prompts = ["1", "2"] if smoke else ["1", "8"]
    # --batch only in the smoke run (so it cannot rot): the GPU minutes go to the single-conversation table
    multiround = ["--config", "tiny", "--rounds", "2", "--batch", "2"] if smoke else ["--config", "7b", "--rounds", "8"]
    train = ["--preset", "tiny", "--variant", "0", "--steps", "1"] if smoke else ["--preset", "llama1b", "--steps", "3"]
    return {
        "msda": msda,
        "hipie": [Step("HIPIE forward, 1 and 8 prompts", py + [str(BENCH / "hipie_forward.py"), "--prompts", *prompts,
                                                                *hipie_args], 300 if smoke else 90)],
        "multiround": [Step("multi-round latency", py + [str(BENCH / "multiround.py"), *multiround],
                            300 if smoke else 90)],
        "train": [Step("train step", py + [str(BENCH / "train_step.py"), *train], 300 if smoke else 100)],
    }


def run_step(step: Step, deadline: float, env: dict[str, str]) -> tuple[str, str]:
    """(status, output) of one step, cut at its cap or at the suite's deadline, whichever is first."""
    budget = min(step.cap_s, deadline - time.monotonic())
    if budget < 5:
        return "skipped (suite time budget spent)", ""
    t0 = time.monotonic()
    try:
        proc = subprocess.run(step.argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return f"timed out after {budget:.0f} s (partial output below)", out
    status = f"ok in {time.monotonic() - t0:.0f} s" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    out = proc.stdout
    if proc.returncode:
        out += "\n" + "\n".join(proc.stderr.strip().splitlines()[-15:])
    return status, out


def _table_lines(output: str) -> str:
    """The markdown tables and the header lines of a step's output (warnings and logs dropped)."""
    keep = [ln for ln in output.splitlines()
            if ln.startswith(("|", "backend=", "machine:", "'vs xla'", "versions:", "parity:"))
            or re.match(r"\d+ vs \d+ prompt", ln)]
    return "\n".join(keep) if keep else "```\n" + "\n".join(output.strip().splitlines()[-20:]) + "\n```"


def env_section(device_kind: str) -> list[str]:
    import jax

    lines = [f"- device: {device_kind} ({jax.device_count()} x {jax.default_backend()}), host {platform.node()}",
             f"- nominal HBM bandwidth: {nominal_gbps(device_kind) or 'unknown'} GB/s"]
    versions, missing = [], []
    for module, dist in MODULES:
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")  # reads metadata, imports nothing
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{module} (pip: {dist})")
    lines.append("- versions: " + ", ".join(versions))
    lines.append("- missing modules: " + (", ".join(missing) if missing else "none"))
    return lines


def targets(tmp: Path, outputs: dict[str, str]) -> list[str]:
    """The issue's GPU targets, checked where the numbers exist."""
    lines = ["| target | measured | met |", "|---|---|---|"]
    path = tmp / "msda.json"
    data = json.loads(path.read_text()) if path.exists() else {"rows": [], "device": ""}
    peak = nominal_gbps(data["device"])
    kernel_rows = [r for r in data["rows"]
                   if r["size"] == "enc_b1" and r["pass"] == "fwd" and r["impl"] not in ("xla", "torch")]
    for r in kernel_rows:
        frac = r["gbps"] / peak if peak else None
        ok = r["vs_xla"] >= 3 and frac is not None and frac >= 0.6
        lines.append(f"| {r['impl']} MSDA fwd >= 3x XLA and >= 60 % of HBM, encoder, {r['dtype']} | "
                     f"{r['vs_xla']:.2f}x, {'—' if frac is None else f'{frac:.0%}'} | {'yes' if ok else 'no'} |")
    if not kernel_rows:
        lines.append("| Pallas MSDA fwd >= 3x XLA and >= 60 % of HBM, encoder | no data | — |")
    speedup = re.findall(r"^\|\s*8\s*\|.*\|\s*([\d.]+)x\s*\|\s*$", outputs.get("multiround", ""), re.M)
    lines.append(f"| round-8 latency, KV cache >= 5x faster than recompute | "
                 f"{speedup[-1] + 'x' if speedup else 'no data'} | "
                 f"{('yes' if float(speedup[-1]) >= 5 else 'no') if speedup else '—'} |")
    mfu = re.findall(r"\|\s*([\d.]+)%\s*\|\s*$", outputs.get("train", ""), re.M)
    lines.append(f"| llama1b train step >= 40 % MFU | {mfu[-1] + '%' if mfu else 'no data'} | "
                 f"{('yes' if float(mfu[-1]) >= 40 else 'no') if mfu else '—'} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks that every section runs")
    ap.add_argument("--only", nargs="+", choices=["msda", "hipie", "multiround", "train"], default=None)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="whole-suite limit (default 470 s; smoke 1200 s: it only checks that every step runs)")
    ap.add_argument("--out", default=None, help="report path (default benchmarks/results/gpu_suite-<device>.md)")
    args = ap.parse_args()
    start = time.monotonic()
    deadline = start + (args.budget_s or (1200 if args.smoke else 470))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
        os.environ["JAX_PLATFORMS"] = "cpu"

    import jax

    device_kind = jax.devices()[0].device_kind
    if not args.smoke and jax.default_backend() != "gpu":
        print(f"warning: backend is {jax.default_backend()}, not gpu: the numbers will not be GPU numbers",
              file=sys.stderr)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_kind).strip("-").lower()
    out = Path(args.out) if args.out else BENCH / "results" / f"gpu_suite-{slug}.md"
    report = [f"# GPU suite{' (smoke: tiny shapes, CPU)' if args.smoke else ''}: {device_kind}, "
              f"{time.strftime('%Y-%m-%d %H:%M')}", "", "## env", "", *env_section(device_kind)]
    outputs: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for section, steps in plan(args.smoke, device_kind, tmp).items():
            if args.only and section not in args.only:
                continue
            report += ["", f"## {section}"]
            for step in steps:
                status, output = run_step(step, deadline, env)
                print(f"[{time.monotonic() - start:5.0f} s] {section}: {step.title}: {status}", flush=True)
                outputs[section] = outputs.get(section, "") + output
                report += ["", f"### {step.title}: {status}", "", _table_lines(output)]
        report += ["", "## targets", "", *targets(tmp, outputs)]
    report += ["", f"Suite wall time: {time.monotonic() - start:.0f} s."]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report) + "\n")
    print(f"report: {out}")


if __name__ == "__main__":
    main()
