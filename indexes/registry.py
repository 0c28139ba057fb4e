"""The registry of name-index backends: kind -> class. Backends register themselves on import.

A kind is either a registered key ("flat", "dense", "faiss") or a parametrised key "<key>:<spec>" for
backends that take a spec, e.g. "faiss:IVF4096,SQ8": the class registered under "faiss" binds the spec
(its `with_spec` classmethod) and returns a class whose `kind` is the whole string, so the index
manifest's `index_kind` alone recreates the backend.
"""

from __future__ import annotations

from .base import NameIndexBackend, UnknownBackendError

_BACKENDS: dict[str, type] = {}


def register_backend(cls: type) -> type:
    _BACKENDS[cls.kind] = cls
    return cls


def backend_kinds() -> list[str]:
    """The registered keys (parametrised kinds such as "faiss:IVF1024,Flat" are not listed)."""
    _load_builtin_backends()
    return sorted(_BACKENDS)


def get_backend(kind: str) -> type[NameIndexBackend]:
    _load_builtin_backends()
    base, sep, spec = kind.partition(":")
    try:
        cls = _BACKENDS[base]
    except KeyError:
        raise UnknownBackendError(f"unknown index kind {kind!r}; known kinds: {', '.join(sorted(_BACKENDS))}"
                                  " (parametrised: faiss:<factory string>)") from None
    if not sep:
        return cls
    with_spec = getattr(cls, "with_spec", None)
    if with_spec is None:
        raise UnknownBackendError(f"index kind {base!r} takes no spec, got {kind!r}")
    return with_spec(spec)


def _load_builtin_backends() -> None:
    from . import dense, faiss_backend, flat  # noqa: F401 - importing registers them
