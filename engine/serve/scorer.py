"""One typed name against one person's photos, over an index opened once: `query`'s attack for one person.

The model is loaded and the name indexes opened when the server starts (held in memory between requests
when they fit `--resident-gib`, else opened template by template per request, as `query` does). Per request:
the photos are encoded as `query` encodes them, each template's index is searched exactly (approximate
kinds re-rank, certify and brute-force what they cannot certify: every top-1 is the exact arg-max), a
name missing from the index is encoded for the request and scored exactly beside it (`merge_extra`), and
paper mode votes (`votes.py`). Requests take turns on the model (one lock): torch modules are not made for
concurrent forward passes, and two requests at once would only share the same cores.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..candidates.identity import NameTokens
from ..candidates.names_file import check_name, normalize_name
from ..candidates.prompt_lengths import check_prompt_lengths
from ..evaluate.scores import continuous_scores
from ..index.encode import encode_name_prompts
from ..index.reader import NameIndex, open_index
from ..model.load import LoadedModel, load_model
from ..query.cells import BRUTE_FORCE, CERTIFIED, EXACT_BY_INDEX
from ..query.search import merge_extra
from ..query.votes import NO_MODE, PaperModeVotes, check_tau, paper_mode_votes
from .photos import DecodedPhoto
from .settings import ServeSettings

log = logging.getLogger(__name__)

HOW_FOUND = {
    "index": "the name is one of the index's candidates",
    "tokens": "the name is an index candidate spelt otherwise (the same token ids to the model's tokenizer)",
    "added": "the name is not among the index's candidates: it was encoded for this request and scored "
             "exactly beside them, as `query` does",
}


@dataclass(frozen=True)
class TypedName:
    text: str  # NFC, stripped
    candidate_id: int  # its row among the candidates (index names, then this request's added name)
    how: str  # a HOW_FOUND key
    cut_prompts: int  # templates whose prompt with this name is longer than the model's context (cut)


@dataclass(frozen=True)
class NameScore:
    """The answer for one name and one person's photos (M photos, T templates, k names kept)."""

    name: TypedName
    photos: list[DecodedPhoto]
    templates: list[str]
    tau: int
    votes: PaperModeVotes  # one person
    topk_ids: np.ndarray  # int64 [M, T, k]
    topk_scores: np.ndarray  # float32 [M, T, k]
    vote_share: float
    margin: float
    margin_censored: float  # share of the pairs whose margin is only an upper bound
    how_exact: dict[str, int]  # top-1s exact by the index / certified / brute-forced
    seconds: dict[str, float]

    @property
    def score(self) -> int:
        return int(self.votes.scores[0])

    @property
    def member(self) -> bool:
        return self.score >= self.tau


class IndexScorer:
    """A built index and its model, ready to score a typed name against photos; thread-safe."""

    def __init__(self, settings: ServeSettings, model: LoadedModel | None = None):
        self.settings = settings
        self.index: NameIndex = open_index(settings.index_dir)
        check_tau(settings.tau, self.index.num_templates)
        self.model = model or load_model(self.index.manifest.model_info.as_spec(), settings.device,
                                         settings.precision)
        self.index.check_model(self.model.info)
        self.templates = list(self.index.templates)
        self.search_params = dict(self.index.manifest.search_params)
        self._tokens = NameTokens(self.model.tokenizer)
        self._by_skeleton = _skeleton_table(self._tokens, self.index.names)
        self._use_gpu = self.model.device.type == "cuda"
        self.index_bytes = _data_bytes(self.index.data_dir)
        self._held = (self.index.kind.hold_searchers(self.index, use_gpu=self._use_gpu)
                      if self.index_bytes <= settings.resident_gib * 2**30 else None)
        self._lock = threading.Lock()
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        log.info("serve: index %s (%d names x %d templates, %s, %.1f MB, %s), model %s on %s",
                 settings.index_dir, len(self.index.names), len(self.templates), self.index.manifest.index_kind,
                 self.index_bytes / 1e6, "held in memory" if self.resident else "opened per request",
                 self.model.info.model, self.model.device)

    @property
    def resident(self) -> bool:
        return self._held is not None

    @property
    def waiting(self) -> int:
        """Requests waiting for the model or using it now."""
        return self._waiting

    def close(self) -> None:
        self._held = None
        self.index.close()

    def typed_name(self, raw: str) -> TypedName:
        """The name as the index knows it (by string, else by token ids), or as an added candidate."""
        name = normalize_name(raw)
        check_name(name, where="name")
        cut = check_prompt_lengths(self.model.tokenizer, self.templates, [name], self.model.info.context_length)
        cut_prompts = int(sum(cut.truncated_per_template))
        found = self.index.name_id(name)
        if found is not None:
            return TypedName(name, found, "index", cut_prompts)
        maybe = self._by_skeleton.get(self._tokens.skeletons([name])[0], [])
        if maybe:
            key = self._tokens.keys([name])[0]
            for i, other in zip(maybe, self._tokens.keys([self.index.names[i] for i in maybe])):
                if other == key:
                    return TypedName(name, i, "tokens", cut_prompts)
        return TypedName(name, len(self.index.names), "added", cut_prompts)

    def score(self, raw_name: str, photos: list[DecodedPhoto]) -> NameScore:
        """Paper mode and the continuous scores of `raw_name` over `photos` (at least one)."""
        name = self.typed_name(raw_name)
        with self._waiting_lock:
            self._waiting += 1
        try:
            with self._lock:
                return self._score(name, photos)
        finally:
            with self._waiting_lock:
                self._waiting -= 1

    def _score(self, name: TypedName, photos: list[DecodedPhoto]) -> NameScore:
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        pixels = torch.stack([self.model.preprocess(p.image) for p in photos])
        emb = self.model.encode_images(pixels)
        seconds["encode photos"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        extra = encode_name_prompts(self.model, self.templates, [name.text]) if name.how == "added" else None
        seconds["encode name"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ids, scores, how_exact = self._search(emb, extra)
        seconds["search"] = time.perf_counter() - t0
        person = np.zeros(len(photos), np.int64)
        true_ids = np.array([name.candidate_id], np.int64)
        votes = paper_mode_votes(ids[:, :, 0], person, true_ids)
        cont = continuous_scores(ids, scores, person, true_ids)
        return NameScore(name, photos, self.templates, self.settings.tau, votes, ids, scores,
                         float(cont.vote_share[0]), float(cont.margin[0]), float(cont.censored[0]), how_exact,
                         {k: round(v, 4) for k, v in seconds.items()})

    def _search(self, emb: np.ndarray, extra: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        n_names = len(self.index.names)
        k = min(self.settings.top_k, n_names + (0 if extra is None else extra.shape[1]))
        ids = np.zeros((len(emb), len(self.templates), k), np.int64)
        scores = np.zeros((len(emb), len(self.templates), k), np.float32)
        counts: dict[str, int] = defaultdict(int)
        searchers = self._held if self._held is not None else \
            self.index.kind.open_searchers(self.index, use_gpu=self._use_gpu)
        for searcher in searchers:
            res = searcher.search(emb, k, self.search_params or None, True)  # fallback: every top-1 exact
            for j, t in enumerate(res.templates):
                s, i = merge_extra(n_names, t, emb, res.scores[:, j], res.ids[:, j], extra, k)
                ids[:, t], scores[:, t] = i, s
            status = np.select([res.exact_by_index, res.certified, res.fell_back],
                               [EXACT_BY_INDEX, CERTIFIED, BRUTE_FORCE], -1)
            for key, code in (("exact_by_index", EXACT_BY_INDEX), ("certified", CERTIFIED),
                              ("brute_forced", BRUTE_FORCE)):
                counts[key] += int((status == code).sum())
            if (status == -1).any():
                raise RuntimeError("a top-1 was neither exact nor certified with fallback on")
        return ids, scores, dict(counts)


def tied_templates(votes: PaperModeVotes) -> np.ndarray:
    """bool [T]: templates whose first place is shared by several names (no plurality: never a hit)."""
    return (votes.modes[0] == NO_MODE) & (votes.mode_votes[0] > 0)


def _skeleton_table(tokens: NameTokens, names: list[str]) -> dict:
    """skeleton -> the index rows with it: a typed name is then matched by tokens without walking every name."""
    table: dict = defaultdict(list)
    for i, skeleton in enumerate(tokens.skeletons(names)):
        table[skeleton].append(i)
    return dict(table)


def _data_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
