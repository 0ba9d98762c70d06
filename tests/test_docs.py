"""The generated reference docs match the code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from loopwatch._docs import FIELD_DOCS, configuration_markdown, events_markdown, field_doc
from loopwatch._events import EVENT_TYPES

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_configuration_reference_is_current() -> None:
    """If this fails: python -m loopwatch._docs, and commit docs/reference/configuration.md."""
    assert (DOCS / "reference" / "configuration.md").read_text() == configuration_markdown()


def test_events_reference_is_current() -> None:
    """If this fails: python -m loopwatch._docs, and commit docs/reference/events.md."""
    assert (DOCS / "reference" / "events.md").read_text() == events_markdown()


def test_events_reference_lists_every_event_and_field() -> None:
    """Each event has its section, and each of its fields a row with a meaning."""
    page = events_markdown()
    for cls in EVENT_TYPES:
        section = page.split(f"## `{cls.event}`\n", 1)[1].split("\n## ", 1)[0]
        for f in dataclasses.fields(cls):
            if f.name in ("time", "pid", "origin", "route", "context"):  # common to all
                assert f"- `{f.name}`: {FIELD_DOCS[f.name]}." in page
            else:
                assert f"| `{f.name}` |" in section, (cls.event, f.name)
                assert f"| {field_doc(cls.event, f.name)} |" in section, (cls.event, f.name)
