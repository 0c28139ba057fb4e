"""The registry of index kinds: kind -> class. Kinds register themselves on import.

A kind is either a registered key ("flat", "dense", "faiss", "ensemble") or a parametrised key
"<key>:<spec>" for kinds that take a spec, e.g. "faiss:IVF4096,SQ8": the class registered under "faiss"
binds the spec (its `with_spec` classmethod) and returns a class whose `kind` is the whole string, so the
index manifest's `index_kind` alone recreates the backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from .errors import UnknownBackendError

if TYPE_CHECKING:  # the kinds' modules import this one to register themselves
    from .base import IndexKind

_BACKENDS: dict[str, type[IndexKind]] = {}
_Kind = TypeVar("_Kind", bound="type[IndexKind]")


def register_backend(cls: _Kind) -> _Kind:
    _BACKENDS[cls.kind] = cls
    return cls


def backend_kinds() -> list[str]:
    """The registered keys (parametrised kinds such as "faiss:IVF1024,Flat" are not listed)."""
    _load_builtin_backends()
    return sorted(_BACKENDS)


def get_backend(kind: str) -> type[IndexKind]:
    _load_builtin_backends()
    base, sep, spec = kind.partition(":")
    try:
        cls = _BACKENDS[base]
    except KeyError:
        raise UnknownBackendError(f"unknown index kind {kind!r}; known kinds: {', '.join(sorted(_BACKENDS))}"
                                  " (parametrised: faiss:<factory string>)") from None
    return cls.with_spec(spec) if sep else cls


def _load_builtin_backends() -> None:
    from . import bf16, dense, ensemble, ensemble_bf16, faiss_backend, flat  # noqa: F401 - importing registers them
