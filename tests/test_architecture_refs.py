"""Section citations resolve inside the repository.

Code comments, docstrings, messages and docs cite ``docs/architecture.md`` by section id, e.g.
``(architecture.md \u00a7H8)``. These tests scan the repository's Python and Markdown files and fail when a
citation names a section that has no heading in ``docs/architecture.md``, when a citation is not of the
form ``\u00a7<letter><number>``, when a file cites sections without naming ``architecture.md``, or when
something still points at the private design spec that does not ship with the repository.

(This file spells the section sign as an escape so that it does not cite anything itself.)
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
SECTION = "\u00a7"

#: Folders whose Python files are scanned, and the Markdown files outside docs/ that are.
PY_DIRS = ("segllm_jax", "pallas_kernels", "tools", "tests", "benchmarks", "configs")
EXTRA_MD = ("README.md",)
SKIP_PARTS = {".venv", "__pycache__", ".git", "node_modules"}

HEADING = re.compile(r"^#{2,4} ([A-Z][0-9]+)\. ", re.MULTILINE)
#: A section sign and the id-like characters after it (a trailing '.' is the sentence's).
CITATION = re.compile(SECTION + r"([A-Za-z0-9.\-]*)")
VALID_ID = re.compile(r"[A-Z][0-9]+")
#: Pointers into the private spec (built from pieces so that this file does not match them).
FORBIDDEN = (
    (re.compile(r"\bspec\s*" + SECTION), "cites the private spec ('spec " + SECTION + "...')"),
    (re.compile(r"\bspec G[0-9]"), "cites a private spec gotcha ('spec G...')"),
    (re.compile(r"(?<![A-Za-z0-9_])G[0-9]{1,2}(?![A-Za-z0-9_])"), "bare gotcha tag of the private spec ('G<n>')"),
    (re.compile("|".join(re.escape(name + ".md") for name in ("hipie-" + "training", "segllm-" + "model",
                                                               "hipie-" + "segmentor"))),
     "names a private spec file"),
    (re.compile(re.escape("shared/" + "spec")), "points at the private spec folder"),
)


def section_ids(doc_text: str) -> list[str]:
    """Ids of the ``## X1. Title`` style headings (levels 2 to 4) of the architecture document."""
    return HEADING.findall(doc_text)


def problems(text: str, known: set[str], *, needs_doc_name: bool = True) -> list[str]:
    """Every broken or forbidden citation in ``text`` (one message per problem, with its line number)."""
    out = []
    cited = False
    for number, line in enumerate(text.splitlines(), 1):
        for match in CITATION.finditer(line):
            cited = True
            ref = match.group(1).rstrip(".")
            if not VALID_ID.fullmatch(ref):
                out.append(f"line {number}: malformed citation {SECTION}{match.group(1)!r} "
                           f"(write {SECTION}<letter><number>, e.g. {SECTION}H8)")
            elif ref not in known:
                out.append(f"line {number}: {SECTION}{ref} is not a section of docs/architecture.md")
        for pattern, why in FORBIDDEN:
            if pattern.search(line):
                out.append(f"line {number}: {why}: {line.strip()[:100]}")
    if cited and needs_doc_name and "architecture.md" not in text:
        out.append(f"cites {SECTION} sections but never names architecture.md")
    return out


def scanned_files() -> list[Path]:
    files = [p for d in PY_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    files += sorted((ROOT / "docs").rglob("*.md"))
    files += [ROOT / name for name in EXTRA_MD if (ROOT / name).is_file()]
    return [p for p in files if not SKIP_PARTS.intersection(p.relative_to(ROOT).parts)]


def test_architecture_headings_are_unique() -> None:
    ids = section_ids(DOC.read_text(encoding="utf-8"))
    assert len(ids) > 50, "docs/architecture.md lost its section headings"
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"section ids used twice in docs/architecture.md: {duplicates}"


def test_every_citation_resolves() -> None:
    known = set(section_ids(DOC.read_text(encoding="utf-8")))
    found = {}
    total = 0
    for path in scanned_files():
        text = path.read_text(encoding="utf-8")
        total += len(CITATION.findall(text))
        issues = problems(text, known, needs_doc_name=path != DOC)
        if issues:
            found[str(path.relative_to(ROOT))] = issues
    report = "\n".join(f"{name}: {issue}" for name, issues in found.items() for issue in issues)
    assert not found, f"citations that do not resolve inside the repository:\n{report}"
    assert total > 100, f"only {total} citations found: is the scan looking in the right places?"


def test_the_checker_catches_broken_citations() -> None:
    known = {"H8", "O5"}
    good = f"# two-stage selection (architecture.md {SECTION}H8, {SECTION}O5)."
    assert problems(good, known) == []
    assert problems(f"# see architecture.md {SECTION}H99", known)  # a section that does not exist
    assert problems(f"# see architecture.md {SECTION}2.4.3", known)  # old numbering
    assert problems(f"# see {SECTION}H8", known)  # no document named
    assert problems(f"# (spec {SECTION}H8; architecture.md)", known)
    assert problems("# invalid proposals (G" + "5)", known)
    assert problems("# see hipie-" + "segmentor.md", known)
    assert problems("x = y  # G" + "12 shared heads", known)
    assert not problems("shape [B, G, 4] and group g1 / G_max", known)
