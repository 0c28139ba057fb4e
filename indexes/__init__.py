"""Index kinds behind one interface and a registry: exact FAISS flat, the dense torch baseline, any FAISS
factory string, and the template ensemble; exact decisions from approximate indexes (`search_exact`);
index selection (`choose_index`)."""

from .base import (
    FILL_CHUNK,
    TRAIN_SEED,
    Candidates,
    IndexData,
    IndexKind,
    NameIndexBackend,
    TemplateSearcher,
    TemplateSearchResult,
    as_vectors,
    sort_topk,
    template_file,
    vectors_file,
)
from .choice import IndexChoice, choose_index, estimate_index_bytes
from .ensemble import DEFAULT_CANDIDATES, ENSEMBLE_DIR, EnsembleIndex, TemplateEnsemble
from .errors import VectorFormatError
from .exact import Exactness, ExactSearchResult, exact_topk, search_exact
from .faiss_backend import FaissBackend
from .registry import backend_kinds, get_backend, register_backend

DEFAULT_BACKEND = "flat"

__all__ = ["DEFAULT_BACKEND", "DEFAULT_CANDIDATES", "ENSEMBLE_DIR", "FILL_CHUNK", "TRAIN_SEED", "Candidates",
           "EnsembleIndex", "ExactSearchResult", "Exactness", "FaissBackend", "IndexChoice", "IndexData",
           "IndexKind", "NameIndexBackend", "TemplateEnsemble", "TemplateSearchResult", "TemplateSearcher",
           "as_vectors", "backend_kinds", "choose_index", "estimate_index_bytes", "exact_topk", "get_backend",
           "register_backend", "search_exact", "sort_topk", "template_file", "vectors_file", "VectorFormatError"]
