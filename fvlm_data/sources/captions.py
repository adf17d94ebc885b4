"""Captions as the sources find them: stripped (empty means caption-less), several per input in
order with `caption` first, from a JSON sidecar or tar member."""

from __future__ import annotations

import json


def unstorable(text: str) -> str | None:
    """Why `text` cannot be stored (the store keeps UTF-8), or None: a lone surrogate, which JSON's
    escapes can spell ("\\ud800") and a file name of undecodable bytes becomes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"has a lone surrogate {text[e.start]!r} at character {e.start} (not Unicode text)"
    return None


def storable(text: str) -> str:
    """`text` with each lone surrogate written out as its escape ("\\ud800"): what a failed row records."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def clean(text: str) -> str | None:
    """Stripped caption; empty means caption-less."""
    text = text.strip()
    return text or None


def all_captions(caption: str | None, captions: tuple[str, ...] | list[str]) -> tuple[str | None, tuple[str, ...]]:
    """(first caption, every caption in order) of a row or sidecar giving `caption` and/or a `captions`
    list: `caption`, when given, comes first (unless it already is)."""
    captions = tuple(captions)
    if caption is None:
        return (captions[0] if captions else None), captions
    return caption, (captions if captions and captions[0] == caption else (caption, *captions))


def json_captions(raw: bytes) -> tuple[str | None, tuple[str, ...]]:
    """(caption, captions) of a JSON sidecar's `caption` and `captions` (a list); wrong types are ignored."""
    data = json.loads(raw)  # json.JSONDecodeError is a ValueError
    data = data if isinstance(data, dict) else {}
    caption, captions = data.get("caption"), data.get("captions")
    captions = [c for c in map(clean, captions) if c] if isinstance(captions, list) and all(
        isinstance(c, str) for c in captions) else []
    return all_captions(clean(caption) if isinstance(caption, str) else None, captions)
