"""Name-index backends (exact FAISS flat, dense torch baseline) behind one interface and a registry."""

from .base import NameIndexBackend, as_vectors, sort_topk
from .registry import backend_kinds, get_backend, register_backend

DEFAULT_BACKEND = "flat"

__all__ = ["DEFAULT_BACKEND", "NameIndexBackend", "as_vectors", "backend_kinds", "get_backend",
           "register_backend", "sort_topk"]
