"""The answer to one request as JSON, guardrails applied here and only here.

Without `--auditor` the answer is about the typed name alone: whether the model picks it, how often, how
close it comes. It never says which other names the photos resemble: with an index of millions of real
names that would turn the page into a face-to-name search for strangers. With `--auditor` it adds, per
photo and template, the name the model picked and, per template, the winning name.
"""

from __future__ import annotations

import numpy as np

from ..query.votes import NO_MODE
from .photos import DuplicateUpload
from .reference import ReferencePopulation
from .scorer import HOW_FOUND, IndexScorer, NameScore, tied_templates

GUARDRAILS = [
    "The answer is only about the name you typed: whether this model picks that name for these photos.",
    "It never lists which other people's names the photos resemble (that would be a reverse face search), "
    "unless the server was started for auditors (--auditor).",
    "Photos are processed in memory and never written to disk or to the embedding store, unless the server "
    "was started with --keep.",
    "A member decision means the model behaves as if it saw this name with this face in training; it is evidence, "
    "not proof, and a non-member decision does not prove absence.",
]


def answer_json(result: NameScore, scorer: IndexScorer, duplicates: list[DuplicateUpload],
                reference: ReferencePopulation | None, auditor: bool) -> dict:
    votes = result.votes
    true_id = result.name.candidate_id
    candidates = scorer.index.names
    tied = tied_templates(votes)
    templates = []
    for t, text in enumerate(result.templates):
        row = {"template": text.replace("{0}", "{name}"), "won": bool(votes.hits[0, t]),
               "votes_for_name": int(votes.true_votes[0, t]), "photos": int(votes.n_images[0]),
               "plurality_votes": int(votes.mode_votes[0, t]), "tied": bool(tied[t])}
        if auditor:
            mode = int(votes.modes[0, t])
            row["plurality_name"] = None if mode == NO_MODE else _candidate(mode, candidates, result.name.text)
        templates.append(row)
    top1 = result.topk_ids[:, :, 0]
    photos = []
    for m, photo in enumerate(result.photos):
        in_topk = result.topk_ids[m] == true_id  # [T, k]
        found = in_topk.any(axis=1)
        rank = np.where(found, np.argmax(in_topk, axis=1) + 1, 0)
        cosine = np.where(found, result.topk_scores[m][np.arange(len(rank)), np.maximum(rank - 1, 0)], np.nan)
        row = {"position": photo.position, "filename": photo.filename, "sha256": photo.sha256,
               "templates_won": int((top1[m] == true_id).sum()),
               "name_rank": [int(r) if r else None for r in rank],  # 1 = picked; None: not in the top k
               "name_cosine": [None if np.isnan(c) else round(float(c), 6) for c in cosine]}
        if auditor:
            row["picked_names"] = [_candidate(int(c), candidates, result.name.text) for c in top1[m]]
            row["picked_cosines"] = [round(float(s), 6) for s in result.topk_scores[m, :, 0]]
        photos.append(row)
    reference_share = (None if reference is None else
                       reference.share_picking(true_id, result.name.text, len(candidates)))
    return {
        "name": result.name.text,
        "name_is": result.name.how, "name_is_text": HOW_FOUND[result.name.how],
        "prompts_cut_at_context": result.name.cut_prompts,
        "score": result.score, "templates_total": len(result.templates), "tau": result.tau,
        "decision": "member" if result.member else "non-member",
        "photos_used": len(result.photos),
        "duplicates_skipped": [{"position": d.position, "filename": d.filename, "same_as": d.same_as}
                               for d in duplicates],
        "templates": templates,
        "photos": photos,
        "scores": {
            "paper": result.score,
            "vote_share": result.vote_share,
            "margin": result.margin, "margin_censored_share": result.margin_censored,
            "reference_share": reference_share,
            "calibrated": None if reference_share is None else result.vote_share - reference_share,
            "note": "vote_share, margin and calibrated are not the paper's scores: see the README",
        },
        "reference": None if reference is None else reference.placement(result.score, result.vote_share),
        "exact": {"all_top1_exact": True, **result.how_exact},
        "index": {"names": len(candidates), "kind": scorer.index.manifest.index_kind,
                  "model": scorer.model.info.model},
        "auditor": auditor,
        "timings_s": result.seconds,
    }


def _candidate(cid: int, candidates: list[str], typed: str) -> str:
    return candidates[cid] if cid < len(candidates) else typed  # ids past the index: the added typed name
