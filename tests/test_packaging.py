"""The package list in pyproject.toml is explicit (because of the converter's package-dir mapping):
every Python package folder of the product must be in it, or a plain `pip install` would lose it."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = {v: k for k, v in config["package-dir"].items()}
    found = set()
    for top in ("segllm_jax", "pallas_kernels", "tools/convert_torch_weights"):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).as_posix()
            base = next((m for m in mapping if rel == m or rel.startswith(m + "/")), None)
            name = (mapping[base] + rel[len(base):]) if base else rel
            found.add(name.replace("/", "."))
    assert found == listed, f"unlisted: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_torch_is_pinned_exactly():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    torch_reqs = [r for deps in extras.values() for r in deps if r.startswith("torch")]
    assert torch_reqs == ["torch==2.13.0"]
