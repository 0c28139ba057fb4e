"""Upper bounds on scores of rows an index did not return: the arithmetic behind every certificate.

Float32 rounding. Any n-term float32 dot product is within gamma_n sum|q_i y_i| <= gamma_n ||q|| ||y|| of the
real one (Higham, Accuracy and Stability, Thm 3.1, any summation order), with gamma_n = n u / (1 - n u),
u = 2^-24. Residual codes sum the centroid and residual terms, and decoding rounds too, so faiss's score of a
code is within E(q) = 2 gamma_{D+2} ||q|| S of q.xhat, with S = max over stored rows of ||c_j|| + ||xhat - c_j||
(>= ||xhat||). On a GPU with float16 flat storage the query is rounded to float16 as well, which adds
||qhat - q|| max||xhat|| <= (2^-11 ||q|| + sqrt(D) 2^-25) max||xhat|| and uses the float16 storage error as eps.

Inverted lists. For a row x in list j with centroid c_j:
    - list j not probed:  q.x = q.c_j + q.(x - c_j) <= q.c_j + ||q|| r_j,   r_j = max_{x in j} ||x - c_j||
      (Cauchy-Schwarz), and, the tighter one when rows lie near a sphere, the cone bound
      q.x = ||q|| ||x|| cos(angle(q, x)) <= ||q|| rho_j cos(max(0, phi_j - theta_j)), with
      phi_j = angle(q, c_j), theta_j = max_{x in j} angle(x, c_j), rho_j = max_{x in j} ||x||: by the
      triangle inequality for angles, angle(q, x) >= phi_j - theta_j, and cos decreases on [0, pi]
      (when that cosine is negative, q.x <= 0 and 0 is used). The minimum of the two is used.
    - list j probed, x not returned: faiss scored x from its code as s~(x) <= s~_k' (the k'-th returned
      score: the scan keeps the best k'), |s~(x) - q.xhat| <= E(q), and
      q.x = q.xhat + q.(x - xhat) <= s~(x) + E(q) + ||q|| eps_j,  eps_j = max_{x in j} ||x - xhat||, where
      xhat = sa_decode(code) is the reconstruction (centroid + decoded residual for residual codes).

All statistics are computed in float64 from the float32 rows and inflated by a relative REL_INFLATE (angles
by ANGLE_SLACK) to absorb their own rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

U32 = 2.0 ** -24  # unit roundoff of float32
REL_INFLATE = 1e-9  # relative inflation of float64 statistics and bound terms, covering their own rounding
ANGLE_SLACK = 1e-6  # radians: covers arccos rounding near 0 and pi
NORM_CAP = 1.0 + 1e-3  # exact backends hold L2-normalised rows (the NameIndexBackend contract)


def gamma(n: int) -> float:
    """Higham's gamma_n for float32: |fl(x.y) - x.y| <= gamma_n sum|x_i y_i| for an n-term dot product."""
    return n * U32 / (1 - n * U32)


def norms64(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", x, x))


def stored_rows_bound(q: np.ndarray, scores: np.ndarray, ids: np.ndarray, ntotal: int) -> np.ndarray:
    """float64 [Q]: the bound for an index whose scores are float32 dot products of its own unit rows: a row
    left out scores at most the last one returned, up to float32 rounding (-inf when every row came back)."""
    if ids.shape[1] >= ntotal:
        return np.full(len(q), -np.inf)
    qn = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))
    return scores[:, -1].astype(np.float64) + gamma(q.shape[1]) * qn * NORM_CAP * (1 + REL_INFLATE)


def code_slack(dim: int, qn: np.ndarray, scale: float) -> np.ndarray:
    """E(q): the float32 rounding of faiss's score of a (residual) code, inflated."""
    return 2.0 * gamma(dim + 2) * qn * scale * (1 + REL_INFLATE) + 1e-30


# Mutable: the statistics accumulate while rows are added (np.maximum.at into the arrays, scalars updated).
@dataclass
class ListStats:
    """What the certificates need, gathered while adding (all float64; see the module docstring).

    IVF: one entry per list; a flat code index: arrays of length 1 (the whole index is one "list")."""

    radius: np.ndarray  # max ||x - c_j|| (IVF), -inf for an empty list
    cos_min: np.ndarray  # min cos(x, c_j) over nonzero members (IVF), +inf for none
    rho: np.ndarray  # max ||x||, -inf for an empty list
    eps: np.ndarray  # max ||x - xhat|| (code reconstruction error)
    count: np.ndarray  # int64 rows per list
    scale: float = 0.0  # max ||c_j|| + ||xhat - c_j|| (>= ||xhat||): the E(q) magnitude
    eps16: float = 0.0  # max ||x - float16(x)|| (GPU float16 flat storage)
    norm16: float = 0.0  # max ||float16(x)||

    @classmethod
    def empty(cls, nlists: int) -> ListStats:
        return cls(radius=np.full(nlists, -np.inf), cos_min=np.full(nlists, np.inf),
                   rho=np.full(nlists, -np.inf), eps=np.zeros(nlists), count=np.zeros(nlists, np.int64))

    def add_listed(self, x64: np.ndarray, xhat: np.ndarray, lists: np.ndarray, c: np.ndarray) -> None:
        """Rows x64 (float64) stored in `lists` with centroids c (float64, one per row), reconstructed as xhat."""
        cn = norms64(c)
        xn = norms64(x64)
        self.scale = max(self.scale, float((cn + norms64(xhat - c)).max()), float(norms64(xhat).max()))
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.einsum("ij,ij->i", x64, c) / (xn * cn)
        cos[(xn == 0) | (cn == 0)] = np.inf  # a zero row scores 0; a zero centroid has no cone
        np.maximum.at(self.radius, lists, norms64(x64 - c))
        np.minimum.at(self.cos_min, lists, cos)
        np.maximum.at(self.rho, lists, xn)
        np.maximum.at(self.eps, lists, norms64(x64 - xhat))
        np.add.at(self.count, lists, 1)

    def add_whole(self, x: np.ndarray, x64: np.ndarray, xhat: np.ndarray, *, flat: bool) -> None:
        """Rows of an index scanned whole (one "list"); `flat`: float32 rows a GPU may store in float16."""
        self.scale = max(self.scale, float(norms64(xhat).max()))
        self.rho[0] = max(self.rho[0], float(norms64(x64).max()))
        self.eps[0] = max(self.eps[0], float(norms64(x64 - xhat).max()))
        self.count[0] += len(x)
        if flat:
            with np.errstate(over="ignore"):
                x16 = x.astype(np.float16).astype(np.float64)
            self.eps16 = max(self.eps16, float(norms64(x64 - x16).max()))
            self.norm16 = max(self.norm16, float(norms64(x16).max()))

    def codes_bound(self, dim: int, scores: np.ndarray, ids: np.ndarray, qn: np.ndarray, ntotal: int,
                    *, float16: bool) -> np.ndarray:
        """float64 [Q]: the bound of an index scanned whole, from its k'-th returned score (-inf: all returned).
        float16: the rows are searched from GPU float16 storage (query rounded to float16 too)."""
        if float16:
            qerr = (2.0 ** -11 * qn + math.sqrt(dim) * 2.0 ** -25) * self.norm16
            slack = 2.0 * gamma(dim + 2) * qn * self.norm16 + qerr + qn * self.eps16
        else:
            slack = code_slack(dim, qn, self.scale) + qn * self.eps[0]
        bound = scores[:, -1].astype(np.float64) + slack * (1 + REL_INFLATE)
        everything = (ids[:, -1] < 0) | (ids.shape[1] >= ntotal)
        return np.where(everything, -np.inf, bound)

    def list_bounds(self, centroids: np.ndarray, qn: np.ndarray, cs: np.ndarray) -> np.ndarray:
        """float64 [Q, nlist]: an upper bound on q.x over the members of each list (-inf for empty lists), from
        the query norms qn [Q] and the exact centroid scores cs = q.c_j [Q, nlist]."""
        c64 = centroids.astype(np.float64)
        cn = norms64(c64)
        radius = self.radius * (1 + REL_INFLATE)
        ball = cs + qn[:, None] * radius[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            cos_phi = np.clip(cs / (qn[:, None] * cn[None, :]), -1.0, 1.0)
            phi = np.arccos(cos_phi)
            theta = np.arccos(np.clip(self.cos_min, -1.0, 1.0)) + ANGLE_SLACK
            psi = np.maximum(phi - theta[None, :] - ANGLE_SLACK, 0.0)
            cone = qn[:, None] * (self.rho * (1 + REL_INFLATE))[None, :] * np.maximum(np.cos(psi), 0.0)
        no_cone = (~np.isfinite(cone) | (cn[None, :] == 0) | (qn[:, None] == 0)
                   | ~np.isfinite(self.cos_min)[None, :])
        cone = np.where(no_cone, np.inf, cone)
        ub = np.minimum(ball, cone)
        ub = ub + REL_INFLATE * (np.abs(ub) + qn[:, None] * (cn + radius)[None, :]) + 1e-30
        return np.where((self.count > 0)[None, :], ub, -np.inf)

    def to_json(self) -> dict[str, Any]:
        def enc(a: np.ndarray) -> list:
            # JSON has no infinities: None stands for the array's neutral value (-inf or +inf).
            return [None if not math.isfinite(v) else float(v) for v in a.tolist()]

        return {"radius": enc(self.radius), "cos_min": enc(self.cos_min), "rho": enc(self.rho),
                "eps": enc(self.eps), "count": self.count.tolist(),
                "scale": enc(np.array([self.scale]))[0], "eps16": enc(np.array([self.eps16]))[0],
                "norm16": enc(np.array([self.norm16]))[0]}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ListStats:
        def dec(values: list, neutral: float) -> np.ndarray:
            return np.array([neutral if v is None else v for v in values], np.float64)

        def scalar(key: str) -> float:
            return np.inf if obj[key] is None else float(obj[key])

        return cls(radius=dec(obj["radius"], -np.inf), cos_min=dec(obj["cos_min"], np.inf),
                   rho=dec(obj["rho"], -np.inf), eps=dec(obj["eps"], 0.0),
                   count=np.asarray(obj["count"], np.int64),
                   scale=scalar("scale"), eps16=scalar("eps16"), norm16=scalar("norm16"))
