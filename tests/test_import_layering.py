"""``tools/convert_torch_weights`` (installed as ``segllm_jax_convert``) may import ``segllm_jax``; ``segllm_jax``
never imports the converter, so the two cannot form an import cycle (hidden otherwise: the converter is installed
under another name). The one exception is the front-end ``apps/cli.py``, whose ``convert`` / ``export`` / ``check``
subcommands run the converter and which nothing in the converter imports. And the front-ends (``segllm_jax/apps``)
sit on top: no core module imports them."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONVERTER = ("segllm_jax_convert", "tools")
FRONT_ENDS = {"segllm_jax/apps/cli.py"}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-local imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_segllm_jax_never_imports_the_converter():
    offenders = {}
    for path in sorted((ROOT / "segllm_jax").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in FRONT_ENDS:
            continue
        bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in CONVERTER)
        if bad:
            offenders[rel] = bad
    assert not offenders, f"segllm_jax modules importing the converter: {offenders}"


def test_the_scan_sees_imports():
    """The exempt front-end does import the converter: the scan would catch a module that does."""
    assert any(m.startswith("segllm_jax_convert") for m in imported_modules(ROOT / "segllm_jax/apps/cli.py"))


def test_core_modules_never_import_the_front_ends():
    offenders = {}
    for path in sorted((ROOT / "segllm_jax").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("segllm_jax/apps/"):
            continue
        bad = sorted(m for m in imported_modules(path) if m == "segllm_jax.apps" or m.startswith("segllm_jax.apps."))
        if bad:
            offenders[rel] = bad
    assert not offenders, f"core modules importing the front-ends: {offenders}"
