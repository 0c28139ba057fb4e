"""Per-call search parameters of faiss indexes: which ones an index takes, their checks, and the faiss
SearchParameters objects built from them for one call (the shared index's own settings are never touched).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from .errors import SearchParamsError
from .structure import find_hnsw, is_hnsw


def default_nprobe(nlist: int) -> int:
    return int(min(nlist, max(8, nlist // 32)))


@dataclass(frozen=True)
class ParamRules:
    """The search parameters one faiss index takes (key -> int or bool) and the range of nprobe."""

    factory: str  # named in error messages
    allowed: Mapping[str, type]
    nlist: int | None  # lists of the IVF index inside, None for none

    @classmethod
    def of(cls, index: faiss.Index, ivf: Any, factory: str) -> ParamRules:
        """The rules of `index`, whose IVF layer (itself or under a pre-transform) is `ivf` (or None)."""
        if ivf is not None:
            allowed = {"nprobe": int, "max_codes": int}
            if is_hnsw(ivf.quantizer):
                allowed["quantizer_efSearch"] = int
            return cls(factory, allowed, int(ivf.nlist))
        if find_hnsw(index) is not None:
            return cls(factory, {"efSearch": int, "check_relative_distance": bool, "bounded_queue": bool}, None)
        return cls(factory, {}, None)

    def check(self, params: Mapping[str, Any], *, what: str = "search parameters") -> dict[str, Any]:
        """A copy of `params`, or a SearchParamsError naming the first key or value that does not fit."""
        for key, value in params.items():
            if key not in self.allowed:
                valid = ", ".join(sorted(self.allowed)) or "none"
                raise SearchParamsError(f"{what}: faiss index {self.factory!r} takes no search parameter {key!r} "
                                        f"(valid: {valid})")
            typ = self.allowed[key]
            if typ is int and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0):
                raise SearchParamsError(f"{what}: {key} must be a non-negative integer, got {value!r}")
            if typ is bool and not isinstance(value, (bool, np.bool_)):
                raise SearchParamsError(f"{what}: {key} must be true or false, got {value!r}")
        if "nprobe" in params and not 1 <= int(params["nprobe"]) <= int(self.nlist):
            raise SearchParamsError(f"{what}: nprobe must be in 1..{self.nlist} (the number of lists), "
                                    f"got {params['nprobe']!r}")
        if "efSearch" in params and int(params["efSearch"]) < 1:
            raise SearchParamsError(f"{what}: efSearch must be >= 1, got {params['efSearch']!r}")
        return dict(params)


def search_parameters(index: faiss.Index, params: Mapping[str, Any]) -> tuple[Any, list]:
    """A faiss SearchParameters object for one call on `index` (None for no parameters) and the objects it
    points to (keep them alive until the call returns), wrapped for the pre-transform and refine layers above
    the index it is meant for."""
    sp, keep = _inner_search_parameters(params)
    return (wrap_params(index, sp, keep) if sp is not None else None), keep


def _inner_search_parameters(params: Mapping[str, Any]) -> tuple[Any, list]:
    if not params:
        return None, []
    if "nprobe" in params or "max_codes" in params or "quantizer_efSearch" in params:
        sp = faiss.SearchParametersIVF()
        keep: list = [sp]
        if "nprobe" in params:
            sp.nprobe = int(params["nprobe"])
        if "max_codes" in params:
            sp.max_codes = int(params["max_codes"])
        if "quantizer_efSearch" in params:
            qp = faiss.SearchParametersHNSW()
            qp.efSearch = int(params["quantizer_efSearch"])
            sp.quantizer_params = qp
            keep.append(qp)
        return sp, keep
    sp = faiss.SearchParametersHNSW()
    if "efSearch" in params:
        sp.efSearch = int(params["efSearch"])
    if "check_relative_distance" in params:
        sp.check_relative_distance = bool(params["check_relative_distance"])
    if "bounded_queue" in params:
        sp.bounded_queue = bool(params["bounded_queue"])
    return sp, [sp]


def wrap_params(index: faiss.Index, sp: Any, keep: list) -> Any:
    """SearchParameters for `index` that carry `sp` down to the IVF or HNSW index inside it."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = wrap_params(index.index, sp, keep)
    elif isinstance(index, faiss.IndexRefine):
        outer = faiss.IndexRefineSearchParameters()
        outer.base_index_params = wrap_params(index.base_index, sp, keep)
    else:
        return sp
    keep.append(outer)
    return outer
