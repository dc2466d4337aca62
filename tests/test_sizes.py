"""Sizes the project keeps: a thin adapter, no huge module, a README that stays readable."""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "warmup_monitor"


def lines_of_code(path: Path) -> int:
    """Lines holding code: not blank, not only a comment, not inside a docstring."""
    source = path.read_text()
    code_lines: set[int] = set()
    prev = tokenize.INDENT
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                        tokenize.DEDENT, tokenize.ENDMARKER):  # fmt: skip
            if tok.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                prev = tok.type
            continue
        is_docstring = tok.type == tokenize.STRING and prev in (
            tokenize.INDENT,
            tokenize.NEWLINE,
            tokenize.DEDENT,
        )
        prev = tok.type
        if not is_docstring:
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(code_lines)


def test_lines_of_code_counts_code_only(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text(
        '"""Doc\n\nmore."""\n\n# comment\nx = 1  # two\n\n\n'
        'def f():\n    """Doc."""\n    return (1,\n            2)\n'
    )
    assert lines_of_code(sample) == 4  # x = 1, def, and the two lines of return


def test_the_lightning_adapter_is_thin() -> None:
    assert lines_of_code(PACKAGE / "callback.py") <= 200


def test_no_package_module_over_600_lines() -> None:
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 600} == {}


def test_the_readme_stays_short() -> None:
    # 320 until the per-group statistics took a short paragraph and their picture.
    assert len((ROOT / "README.md").read_text().splitlines()) <= 330
