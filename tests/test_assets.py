"""Checks on the datasets shipped in ``pipeline/assets/data``.

These read the committed files only; regenerating them needs PyPI and is done
with ``python -m pipeline.assets.extract_data``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "data"
DJANGO = DATA / "django_en_fr.jsonl"
CHAT = DATA / "chatterbot_en_qa.jsonl"
LICENSES = [DATA / "LICENSES" / "django-LICENSE.txt",
            DATA / "LICENSES" / "chatterbot-corpus-LICENSE.txt"]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse every line; a failure names the offending line."""
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                pytest.fail(f"{path.name}:{lineno}: {exc}")
            assert isinstance(record, dict), f"{path.name}:{lineno} is not an object"
            records.append(record)
    return records


@pytest.mark.parametrize("path", [DJANGO, CHAT, *LICENSES, DATA / "README.md"],
                         ids=lambda p: p.name)
def test_file_exists(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0


@pytest.mark.parametrize("path", [DJANGO, CHAT], ids=lambda p: p.name)
def test_every_line_parses(path: Path) -> None:
    assert _read_jsonl(path)


def test_django_records() -> None:
    records = _read_jsonl(DJANGO)
    assert len(records) >= 500
    for record in records:
        assert set(record) == {"instruction", "input", "output"}, record
        for key in ("instruction", "input", "output"):
            assert isinstance(record[key], str) and record[key].strip(), record
    inputs = [r["input"] for r in records]
    assert len(set(inputs)) == len(inputs), "duplicate English strings"


def test_chat_records_alternate() -> None:
    records = _read_jsonl(CHAT)
    assert records
    for record in records:
        messages = record["messages"]
        assert len(messages) >= 2 and len(messages) % 2 == 0, record
        for i, message in enumerate(messages):
            assert message["role"] == ("user", "assistant")[i % 2], record
            assert isinstance(message["content"], str) and message["content"].strip(), record
        assert messages[-1]["role"] == "assistant"
        assert isinstance(record["category"], str) and record["category"]


@pytest.mark.parametrize("path", LICENSES, ids=lambda p: p.name)
def test_license_text(path: Path) -> None:
    assert "Redistribution and use in source and binary forms" in path.read_text(encoding="utf-8")
