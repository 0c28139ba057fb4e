"""The registry of name-index backends: kind -> class. Backends register themselves on import."""

from __future__ import annotations

from .base import NameIndexBackend, UnknownBackendError

_BACKENDS: dict[str, type] = {}


def register_backend(cls: type) -> type:
    _BACKENDS[cls.kind] = cls
    return cls


def backend_kinds() -> list[str]:
    _load_builtin_backends()
    return sorted(_BACKENDS)


def get_backend(kind: str) -> type[NameIndexBackend]:
    _load_builtin_backends()
    try:
        return _BACKENDS[kind]
    except KeyError:
        raise UnknownBackendError(f"unknown index kind {kind!r}; known kinds: {', '.join(sorted(_BACKENDS))}") from None


def _load_builtin_backends() -> None:
    from . import dense, flat  # noqa: F401 - importing registers them
