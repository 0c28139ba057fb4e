"""Name-index backends (exact FAISS flat, dense torch baseline, any FAISS factory string) behind one interface
and a registry; exact decisions from approximate indexes (`search_exact`); index selection (`choose_index`)."""

from .base import Candidates, NameIndexBackend, as_vectors, sort_topk
from .registry import backend_kinds, get_backend, register_backend

DEFAULT_BACKEND = "flat"

# Imported after DEFAULT_BACKEND and the registry: engine modules import this package while it initialises.
from .choice import IndexChoice, choose_index, estimate_index_bytes
from .exact import Exactness, ExactSearchResult, exact_topk, search_exact
from .faiss_backend import FaissBackend

__all__ = ["DEFAULT_BACKEND", "Candidates", "ExactSearchResult", "Exactness", "FaissBackend", "IndexChoice",
           "NameIndexBackend", "as_vectors", "backend_kinds", "choose_index", "estimate_index_bytes",
           "exact_topk", "get_backend", "register_backend", "search_exact", "sort_topk"]
