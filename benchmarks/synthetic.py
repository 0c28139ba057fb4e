"""Structured synthetic name embeddings with random access by (template, id), and image queries for persons.

Why not uniform noise: random Gaussian rows make every approximate index look broken and every certificate
look easy. Real CLIP text embeddings of names share a large common "text" component, share structure between
names with the same first or last name, and a name's 21 template embeddings are strongly correlated.

The model (all pools float64, unit vectors, text rows live in the first D - D/8 coordinates):
    x_{t,i} = normalise(h M + a F[f_i] + b L[l_i] + c u_i + d G_t + e v_{t,i})
  M       the common text direction;
  F, L    pools of first / last name vectors; f_i, l_i drawn Zipf-like (index = floor(pool * U^zipf)) from a
          hash of (seed, i), so popular first and last names are shared by many names;
  u_i     the name's own vector, v_{t,i} the (name, template) noise, G_t the template's direction;
  u_i and v_{t,i} are Gaussian, generated in blocks of BLOCK_ROWS rows from an SFC64 generator keyed by
  (seed, kind, template, block): any set of rows can be regenerated without the rest (`rows(t, ids)`), so
  10^6 x 21 x 512 never has to exist at once, and random access equals block generation bit for bit.
Image queries of a person with true name i (images_per_person each):
    q = normalise(cos y_i + sqrt(1 - cos^2) o),  y_i = normalise(h M + a F + b L + c u_i) (the name without
    template), cos ~ U(cos_lo, cos_hi), o = normalise(gap + w_p p + w_n n + w_m M) orthogonalised to y_i:
    gap = a shared modality-gap direction in the last D/8 coordinates, p a per-person image vector, n a
    per-image vector. The cosine of a query to its true name's templates lands at ~0.2-0.35 (as CLIP's
    image-text scores), the best other name a little below or above. Non-members (people the model does not
    know, `queries(member_fraction=...)`) draw cos from a lower range: their true name scores well below the
    best other name.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

BLOCK_ROWS = 256  # rows per Philox block: the unit of regeneration
# `template()` fills contiguous chunks of this many rows on threads (numpy's generators and array maths
# release the GIL). Every row depends on its own id alone, so chunking changes no bit of the output.
THREAD_CHUNK_ROWS = 64 * BLOCK_ROWS
_KIND_OWN, _KIND_TEMPLATE = 1, 2


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and mixing weights of the generator (defaults chosen to mimic CLIP text/image statistics)."""

    num_names: int  # N candidate names
    dim: int = 512  # embedding dimension D
    num_templates: int = 21  # T prompt templates
    seed: int = 0  # everything is a function of the seed
    first_pool: int = 2000  # distinct first names
    last_pool: int = 20000  # distinct last names
    zipf: float = 2.0  # popularity skew of first/last names (index = pool * U^zipf)
    common: float = 1.1  # h: weight of the common text direction M
    first: float = 0.75  # a: weight of the first-name vector
    last: float = 0.75  # b: weight of the last-name vector
    own: float = 0.55  # c: weight of the name's own vector
    template: float = 0.35  # d: weight of the template direction G_t
    noise: float = 0.3  # e: weight of the (name, template) noise
    cos_lo: float = 0.26  # query cosine to the template-free name vector: lower end
    cos_hi: float = 0.38  # ... upper end
    person_weight: float = 0.6  # w_p: per-person image component
    image_weight: float = 0.5  # w_n: per-image component
    query_common: float = 0.35  # w_m: the common text direction inside the image component
    nonmember_cos_lo: float = 0.08  # non-members (people the model does not know): query cosine, lower end
    nonmember_cos_hi: float = 0.20  # ... upper end (their true name scores well below the best other name)

    def to_json(self) -> dict:
        return asdict(self)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """A 64-bit mixing hash (splitmix64 finaliser), vectorised over uint64."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _uniform(seed: int, salt: int, ids: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) per id, a pure function of (seed, salt, id)."""
    with np.errstate(over="ignore"):
        key = _splitmix(np.asarray(ids, np.uint64) ^ _splitmix(np.uint64(seed * 1000003 + salt)))
    return (key >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


class SyntheticNames:
    """A synthetic label space: `rows(t, ids)` gives float32 unit rows [len(ids), D] of template t."""

    def __init__(self, config: SyntheticConfig):
        c = self.config = config
        if c.dim < 16 or c.num_names < 1 or c.num_templates < 1:
            raise ValueError(f"need dim >= 16, >= 1 name and template; got {c.dim}, {c.num_names}, "
                             f"{c.num_templates}")
        self.dim, self.text_dim = c.dim, c.dim - c.dim // 8
        rng = np.random.default_rng([c.seed, 0])
        self.common_dir = self._text(rng, 1)[0]
        self.first_vecs = self._text(rng, c.first_pool)
        self.last_vecs = self._text(rng, c.last_pool)
        self.template_vecs = self._text(rng, c.num_templates)
        self._first32 = (c.first * self.first_vecs).astype(np.float32)
        self._last32 = (c.last * self.last_vecs).astype(np.float32)
        gap = np.zeros(c.dim)
        gap[self.text_dim:] = rng.standard_normal(c.dim - self.text_dim)
        self.gap_dir = _unit(gap)
        ids = np.arange(c.num_names, dtype=np.uint64)
        self._cache: tuple[bytes, np.ndarray] | None = None  # the last `_base` (all templates share it)
        self.first_ids = np.minimum((c.first_pool * _uniform(c.seed, 11, ids) ** c.zipf).astype(np.int64),
                                    c.first_pool - 1)
        self.last_ids = np.minimum((c.last_pool * _uniform(c.seed, 12, ids) ** c.zipf).astype(np.int64),
                                   c.last_pool - 1)

    def _text(self, rng: np.random.Generator, n: int) -> np.ndarray:
        a = np.zeros((n, self.dim))
        a[:, :self.text_dim] = rng.standard_normal((n, self.text_dim))
        return _unit(a)

    @property
    def num_names(self) -> int:
        return self.config.num_names

    @property
    def num_templates(self) -> int:
        return self.config.num_templates

    def _gauss_rows(self, kind: int, t: int, ids: np.ndarray) -> np.ndarray:
        """float32 [len(ids), text_dim] Gaussian / sqrt(text_dim) rows, regenerated from their blocks."""
        out = np.empty((len(ids), self.text_dim), np.float32)
        blocks = ids // BLOCK_ROWS
        order = np.argsort(blocks, kind="stable")
        sb = blocks[order]
        starts = np.flatnonzero(np.r_[True, sb[1:] != sb[:-1]])
        ends = np.r_[starts[1:], len(sb)]
        scale = np.float32(1 / np.sqrt(self.text_dim))
        for s, e in zip(starts, ends):
            b = int(sb[s])
            gen = np.random.Generator(np.random.SFC64(np.random.SeedSequence([self.config.seed, kind, t + 1, b])))
            block = gen.standard_normal((BLOCK_ROWS, self.text_dim), dtype=np.float32)
            sel = order[s:e]
            out[sel] = block[ids[sel] - b * BLOCK_ROWS] * scale
        return out

    def _base(self, ids: np.ndarray) -> np.ndarray:
        """float32 [n, D]: h M + a F + b L + c u (the template-free part of a name, unnormalised)."""
        key = ids.tobytes()
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1].copy()
        base = self._base_uncached(ids)
        self._cache = (key, base)
        return base.copy()

    def _base_uncached(self, ids: np.ndarray) -> np.ndarray:
        c = self.config
        base = self._first32[self.first_ids[ids]]
        base += self._last32[self.last_ids[ids]]
        base += (c.common * self.common_dir).astype(np.float32)
        base[:, :self.text_dim] += np.float32(c.own) * self._gauss_rows(_KIND_OWN, -1, ids)
        return base

    def rows(self, t: int, ids: np.ndarray | slice) -> np.ndarray:
        """float32 [len(ids), D] unit rows of template t for names `ids` (an int array or a slice)."""
        if isinstance(ids, slice):
            ids = np.arange(*ids.indices(self.num_names), dtype=np.int64)
        ids = np.asarray(ids, np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_names):
            raise IndexError(f"name ids must lie in [0, {self.num_names}); got {ids.min()}..{ids.max()}")
        if not 0 <= t < self.num_templates:
            raise IndexError(f"template {t} out of range [0, {self.num_templates})")
        return self._finish(t, ids, self._base(ids))

    def _finish(self, t: int, ids: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Template t's rows from the template-free part x (changed in place and returned)."""
        c = self.config
        x += np.float32(c.template) * self.template_vecs[t].astype(np.float32)
        x[:, :self.text_dim] += np.float32(c.noise) * self._gauss_rows(_KIND_TEMPLATE, t, ids)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    __call__ = rows  # a RowSource for indexes.ensemble

    def template(self, t: int, lo: int = 0, hi: int | None = None, threads: int | None = None) -> np.ndarray:
        """Rows lo..hi of template t (a contiguous block), equal bit for bit to `rows(t, slice(lo, hi))`.

        Large blocks are filled in chunks on `threads` threads (default: every core), which is what makes
        10^6 x 21 rows a matter of seconds on a many-core machine rather than minutes."""
        ids = np.arange(*slice(lo, self.num_names if hi is None else hi).indices(self.num_names), dtype=np.int64)
        threads = threads or min(os.cpu_count() or 1, 32)
        if threads == 1 or len(ids) <= THREAD_CHUNK_ROWS:
            return self.rows(t, ids)
        if not 0 <= t < self.num_templates:
            raise IndexError(f"template {t} out of range [0, {self.num_templates})")
        key = ids.tobytes()
        chunks = [slice(i, i + THREAD_CHUNK_ROWS) for i in range(0, len(ids), THREAD_CHUNK_ROWS)]
        with ThreadPoolExecutor(threads) as pool:
            if self._cache is None or self._cache[0] != key:  # the template-free part, shared by all templates
                base = np.empty((len(ids), self.dim), np.float32)

                def fill_base(s: slice) -> None:
                    base[s] = self._base_uncached(ids[s])
                list(pool.map(fill_base, chunks))
                self._cache = (key, base)
            base = self._cache[1]
            out = np.empty_like(base)

            def fill(s: slice) -> None:
                out[s] = base[s]
                self._finish(t, ids[s], out[s])
            list(pool.map(fill, chunks))
        return out

    def name_vectors(self, ids: np.ndarray) -> np.ndarray:
        """float64 [n, D] unit template-free name vectors y_i."""
        return _unit(self._base(np.asarray(ids, np.int64)).astype(np.float64))

    def queries(self, persons: int, images_per_person: int = 30, seed: int = 1, member_fraction: float = 1.0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image queries of `persons` persons with distinct true names.

        member_fraction: the first round(fraction x persons) persons are members (people the model knows:
        query cosine to the true name in cos_lo..cos_hi); the others are non-members (nonmember_cos_lo..hi).
        With fraction 1 the queries are those of earlier versions, bit for bit.
        Returns (queries float32 [persons * images_per_person, D] unit rows, person_of_image int64 [M],
        true_ids int64 [persons])."""
        if not 0.0 <= member_fraction <= 1.0:
            raise ValueError(f"member_fraction must lie in [0, 1], got {member_fraction}")
        c = self.config
        rng = np.random.default_rng([c.seed, 7, seed])
        true = rng.choice(self.num_names, size=min(persons, self.num_names), replace=False).astype(np.int64)
        p = len(true)
        person = np.repeat(np.arange(p), images_per_person)
        y = self.name_vectors(true)[person]
        pv = rng.standard_normal((p, self.dim)) / np.sqrt(self.dim)
        nv = rng.standard_normal((len(person), self.dim)) / np.sqrt(self.dim)
        off = (self.gap_dir + c.person_weight * _unit(pv)[person] + c.image_weight * _unit(nv)
               + c.query_common * self.common_dir)
        off -= (off * y).sum(1, keepdims=True) * y
        cos = rng.uniform(c.cos_lo, c.cos_hi, size=(len(person), 1))
        members = int(round(member_fraction * p))
        if members < p:  # a separate stream, so the members' queries do not depend on the fraction
            other = np.random.default_rng([c.seed, 8, seed]).uniform(c.nonmember_cos_lo, c.nonmember_cos_hi,
                                                                     size=(len(person), 1))
            cos = np.where((person >= members)[:, None], other, cos)
        q = _unit(cos * y + np.sqrt(1 - cos ** 2) * _unit(off))
        return q.astype(np.float32), person.astype(np.int64), true
