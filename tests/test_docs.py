"""The generated reference docs match the code."""

from __future__ import annotations

from pathlib import Path

from loopwatch._docs import configuration_markdown

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_configuration_reference_is_current() -> None:
    """If this fails: python -m loopwatch._docs, and commit docs/reference/configuration.md."""
    assert (DOCS / "reference" / "configuration.md").read_text() == configuration_markdown()
