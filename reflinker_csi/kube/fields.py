"""Reading fields of Kubernetes objects as JSON: a field of the wrong type (hostile or old) reads
as empty, never as an error."""

from __future__ import annotations

from typing import cast

from .api import JSON


def obj(value: object, key: str) -> JSON:
    inner = value.get(key) if isinstance(value, dict) else None
    return cast(JSON, inner) if isinstance(inner, dict) else {}


def objs(value: object, key: str) -> list[JSON]:
    inner = value.get(key) if isinstance(value, dict) else None
    return [cast(JSON, i) for i in inner if isinstance(i, dict)] if isinstance(inner, list) else []


def text(value: object, key: str) -> str:
    inner = value.get(key) if isinstance(value, dict) else None
    return inner if isinstance(inner, str) else ""


def number(value: object, key: str) -> int:
    inner = value.get(key) if isinstance(value, dict) else None
    if isinstance(inner, bool):
        return 0
    if isinstance(inner, int):
        return inner
    if isinstance(inner, str) and inner.isdigit():
        return int(inner)
    return 0


def strings(value: object, key: str) -> dict[str, str]:
    inner = obj(value, key)
    return {k: v for k, v in inner.items() if isinstance(v, str)}


def texts(value: object, key: str) -> tuple[str, ...]:
    inner = value.get(key) if isinstance(value, dict) else None
    return tuple(i for i in inner if isinstance(i, str)) if isinstance(inner, list) else ()
