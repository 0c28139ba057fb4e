"""The attack on data in memory: names and photos in, an AttackResult out, nothing written to disk.

It is `build-index` + `query` (flat index) without the files, made of the engine's own stages: the prompt
templates (`engine/candidates/templates.py`), the text and image encoding (`LoadedModel`, the same
batches of prompts as a build and of photos as a query), an exact index kind's search (ties to the lower
candidate id) with the persons missing from `names` scored exactly beside it (`merge_extra`), and the
paper-mode vote (`paper_mode_votes`). With the same model, names and photos it gives the scores,
decisions and predicted names of `build_index` + `run_query`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from idia_engine.engine.candidates.identity import NameTokens
from idia_engine.engine.candidates.names_file import check_name, normalize_name
from idia_engine.engine.candidates.templates import PAPER_TEMPLATES, normalize_template
from idia_engine.engine.errors import InputError
from idia_engine.engine.index.build import BuildConfig
from idia_engine.engine.index.encode import encode_name_prompts, iter_prompt_embeddings
from idia_engine.engine.model.load import LoadedModel
from idia_engine.engine.progress import Progress, no_progress
from idia_engine.engine.query.images import ImageDataset, Skipped, collate_images, name_key
from idia_engine.engine.query.metrics import label_metrics
from idia_engine.engine.query.run import QueryConfig
from idia_engine.engine.query.search import merge_extra
from idia_engine.engine.query.votes import NO_MODE, check_tau, paper_mode_votes
from idia_engine.indexes import NameIndexBackend, get_backend
from PIL import Image

from .model import Model
from .results import AttackResult, Metrics, PersonResult, PhotoResult, TemplateVote

log = logging.getLogger(__name__)

# The defaults of build-index and query, taken from their configs so that the in-memory attack batches
# prompts and photos, and searches, exactly as they do (batch composition can move float32 results).
_BUILD_DEFAULTS = {f.name: f.default for f in fields(BuildConfig)}
_QUERY_DEFAULTS = {f.name: f.default for f in fields(QueryConfig)}
DEFAULT_TOP_K: int = _QUERY_DEFAULTS["top_k"]
TEXT_BATCH_SIZE: int = _BUILD_DEFAULTS["batch_size"]
IMAGE_BATCH_SIZE: int = _QUERY_DEFAULTS["batch_size"]
SEARCH_CHUNK: int = _QUERY_DEFAULTS["search_chunk"]

Photo = str | Path | Image.Image  # a file path, or a PIL image already in memory


def attack(model: Model | LoadedModel, names: Sequence[str], photos: Mapping[str, Sequence[Photo]], *,
           templates: Sequence[str] | None = None, tau: int = 1, top_k: int = DEFAULT_TOP_K,
           labels: Mapping[str, bool] | None = None, index: str = "flat", text_batch_size: int = TEXT_BATCH_SIZE,
           image_batch_size: int = IMAGE_BATCH_SIZE, progress: Progress = no_progress) -> AttackResult:
    """Run the Identity Inference Attack in paper mode on names and photos in memory (docs/attack.md).

    model: from `load_model` or `from_open_clip` (or the engine's LoadedModel).
    names: the candidate names, full names as written; NFC-normalised and stripped, duplicates dropped
        (first kept, with a warning). Persons of `photos` not among them are added as candidates for this
        run (`AttackResult.candidates_added_for_this_run`), with ids after the names.
    photos: person's name -> their photos: file paths or PIL images (converted to RGB, then the model's
        own validation preprocessing). A file that does not decode is skipped with a reason
        (`AttackResult.skipped`); the attack goes on.
    templates: prompt templates with one `{0}` or `{}` placeholder; None = the paper's 21.
    tau: member iff score >= tau, 1..T.
    top_k: candidate names kept per photo and template (the first is the prediction).
    labels: person -> True (member) / False, for `AttackResult.metrics` (TPR, FPR at tau).
    index: an exact index kind, "flat" (FAISS IndexFlatIP, as build-index's default) or "dense" (torch).
    text_batch_size, image_batch_size: prompts / photos per forward pass (build-index's and query's defaults).
    progress: called as progress(stage, done, total).

    Per photo and template the predicted name is the arg-max of cosine similarity over all candidates
    (ties to the lower candidate id); per person and template, a hit when the unique most frequent
    prediction is the true name; score = hits, 0..T (higher = more likely a member).
    """
    loaded = model.loaded if isinstance(model, Model) else model
    if not isinstance(loaded, LoadedModel):
        raise InputError(f"model must come from idia_engine.load_model or from_open_clip, got {type(model).__name__}")
    templates = _check_templates(templates)
    check_tau(tau, len(templates))
    for what, value in (("top_k", top_k), ("text_batch_size", text_batch_size), ("image_batch_size", image_batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{what} must be a whole number >= 1, got {value!r}")
    kind = _exact_kind(index)
    names = _check_names(names)
    persons = _check_photos(photos)
    labels = _check_labels(labels)

    names, candidate_id, added = _candidates_by_tokens(loaded, names, list(persons))
    candidates = names + added
    added_set = set(added)

    flat, duplicates = _one_vote_per_photo(persons)
    emb, used, skipped = _encode_photos(loaded, flat, image_batch_size, progress)
    skipped = duplicates + skipped
    person_index = {p: i for i, p in enumerate(persons)}
    person_of_image = np.array([person_index[flat[m][0]] for m in used], np.int64)
    true_ids = np.array([candidate_id[p] for p in persons], np.int64)

    k = min(int(top_k), len(candidates))
    extra_emb = encode_name_prompts(loaded, list(templates), added, text_batch_size) if added else None
    top_ids, top_scores = _search(loaded, kind, templates, names, emb, extra_emb, k, text_batch_size, progress)

    votes = paper_mode_votes(top_ids[:, :, 0], person_of_image, true_ids)
    decisions = votes.decisions(tau)
    metrics = None
    if labels is not None:
        engine_metrics, label_info = label_metrics(list(persons), votes.n_images, decisions, labels)
        metrics = Metrics.from_engine(tau, engine_metrics, label_info)
    log.info("attack: %d persons, %d photos (%d skipped), %d candidates, %d templates: %d decided members",
             len(persons), len(used), len(skipped), len(candidates), len(templates), int(decisions.sum()))

    results = tuple(
        PersonResult(
            name=p, n_photos=int(votes.n_images[i]), score=int(votes.scores[i]), decision=bool(decisions[i]),
            in_candidates=p not in added_set, label=None if labels is None else labels.get(p),
            templates=tuple(TemplateVote(template=template,
                                         mode=None if votes.modes[i, t] == NO_MODE else candidates[votes.modes[i, t]],
                                         mode_votes=int(votes.mode_votes[i, t]), true_votes=int(votes.true_votes[i, t]),
                                         hit=bool(votes.hits[i, t]))
                            for t, template in enumerate(templates)))
        for i, p in enumerate(persons))
    photo_results = tuple(
        PhotoResult(person=flat[m][0], source=_source_text(flat[m][1], flat[m][2]),
                    top_names=tuple(tuple(candidates[c] for c in row) for row in top_ids[row_m]),
                    top_cosines=top_scores[row_m])
        for row_m, m in enumerate(used))
    return AttackResult(persons=results, photos=photo_results, skipped=tuple(skipped), templates=templates,
                        candidates=tuple(candidates), candidates_added_for_this_run=tuple(added), tau=int(tau),
                        metrics=metrics, votes=votes)


def _search(loaded: LoadedModel, kind: type[NameIndexBackend], templates: tuple[str, ...], names: list[str],
            emb: np.ndarray, extra_emb: np.ndarray | None, k: int, text_batch_size: int, progress: Progress
            ) -> tuple[np.ndarray, np.ndarray]:
    """Per template, its name prompts into an exact index (one template in memory at a time), every photo
    searched in query's chunks and the added names merged in: (ids int64 [M, T, k], cosines float32 [M, T, k])."""
    n_templates = len(templates)
    ids = np.zeros((len(emb), n_templates, k), np.int64)
    scores = np.zeros((len(emb), n_templates, k), np.float32)
    use_gpu = loaded.device.type == "cuda"
    total, done = n_templates * len(names), 0
    progress("encode prompts", 0, total)
    for t, template in enumerate(templates):
        backend = kind.create(loaded.info.embed_dim, use_gpu=use_gpu)
        for chunk in iter_prompt_embeddings(loaded, template, names, text_batch_size):
            backend.add(chunk)
            done += len(chunk)
            progress("encode prompts", done, total)
        for start in range(0, len(emb), SEARCH_CHUNK):
            queries = emb[start:start + SEARCH_CHUNK]
            s, i = backend.search(queries, k)
            s, i = merge_extra(len(names), t, queries, s, i, extra_emb, k)
            scores[start:start + len(queries), t], ids[start:start + len(queries), t] = s, i
        del backend
        progress("search", t + 1, n_templates)
    return ids, scores


def _encode_photos(loaded: LoadedModel, flat: list[tuple[str, int, Photo]], batch_size: int, progress: Progress
                   ) -> tuple[np.ndarray, list[int], list[Skipped]]:
    """Every photo through query's decoding, preprocessing and image encoder, in batches of `batch_size`:
    (embeddings float32 [M', D] of the usable ones, their positions in `flat`, the skipped ones)."""
    items = [(src if isinstance(src, Image.Image) else Path(src), str(m)) for m, (_, _, src) in enumerate(flat)]
    loader = torch.utils.data.DataLoader(ImageDataset(items, loaded.preprocess), batch_size=batch_size,
                                         num_workers=0, collate_fn=collate_images, shuffle=False)
    parts, used, skipped, done = [], [], [], 0
    progress("encode images", 0, len(items))
    for pixels, keys, failed in loader:
        if pixels is not None:
            parts.append(loaded.encode_images(pixels))
            used.extend(int(key) for key in keys)
        for key, reason in failed.items():
            _, i, src = flat[int(key)]
            skipped.append(Skipped(_source_text(i, src), reason))
        done += len(keys) + len(failed)
        progress("encode images", done, len(items))
    if skipped:
        log.warning("%d photo(s) skipped (e.g. %s: %s)", len(skipped), skipped[0].path, skipped[0].reason)
    emb = np.concatenate(parts) if parts else np.zeros((0, loaded.info.embed_dim), np.float32)
    return emb, used, skipped


def _one_vote_per_photo(persons: Mapping[str, Sequence[Photo]]) -> tuple[list[tuple[str, int, Photo]], list[Skipped]]:
    """(person, position, photo) of every photo once, as query counts them: within one person the same bytes
    (a file given twice, under two paths, or equal PIL images: mode, size and pixels) are one photo with one
    vote, the first kept; the others are skipped with the reason."""
    flat, duplicates = [], []
    for person, srcs in persons.items():
        first: dict[str, str] = {}
        for i, src in enumerate(srcs):
            key = _content_key(src)
            if key is not None and key in first:
                duplicates.append(Skipped(_source_text(i, src), f"the same photo as {first[key]} of {person!r}: "
                                                                 "one photo, one vote"))
                continue
            if key is not None:
                first[key] = _source_text(i, src)
            flat.append((person, i, src))
    if duplicates:
        log.warning("%d duplicate photo(s) dropped (e.g. %s: %s)", len(duplicates), duplicates[0].path,
                    duplicates[0].reason)
    return flat, duplicates


def _content_key(src: Photo) -> str | None:
    """SHA-256 of a file's bytes, or of a PIL image's mode, size and pixels; None for an unreadable file (its
    decode then says why)."""
    digest = hashlib.sha256()
    if isinstance(src, Image.Image):
        digest.update(f"{src.mode} {src.size}".encode())
        digest.update(src.tobytes())
        return "image:" + digest.hexdigest()
    try:
        with open(src, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return "file:" + digest.hexdigest()


def _source_text(i: int, src: Photo) -> str:
    return f"<image {i}>" if isinstance(src, Image.Image) else str(src)


def _exact_kind(index: str) -> type[NameIndexBackend]:
    if index not in ("flat", "dense"):
        raise InputError(f"index {index!r} is not an exact in-memory index; use 'flat' (FAISS) or 'dense' (torch)")
    return get_backend(index)


def _check_templates(templates: Sequence[str] | None) -> tuple[str, ...]:
    if templates is None:
        return PAPER_TEMPLATES
    if isinstance(templates, str):
        raise InputError(f"templates must be a list of templates, got the string {templates!r}; write [{templates!r}]")
    out: list[str] = []
    for i, template in enumerate(templates):
        if not isinstance(template, str):
            raise InputError(f"templates[{i}] must be a string with one {{0}} placeholder, got {type(template).__name__}")
        template = normalize_template(template, where=f"templates[{i}]")
        if template in out:
            raise InputError(f"templates[{i}] {template!r} repeats templates[{out.index(template)}]; "
                             "each template must be distinct")
        out.append(template)
    if not out:
        raise InputError("templates is empty; give at least one template such as 'a photo of {0}', or None")
    return tuple(out)


def _candidates_by_tokens(loaded: LoadedModel, names: list[str], persons: list[str]
                          ) -> tuple[list[str], dict[str, int], list[str]]:
    """(names, person or name -> candidate id, persons added as candidates), with identity decided as build-
    index and query decide it: by the token ids of the model's tokenizer (`candidates/identity.py`). A
    name with the tokens of an earlier one is dropped (warned); two persons with the same tokens are an
    error; a person with the tokens of a name is that name; only the rest are added, ids after the names."""
    tokens = NameTokens(loaded.tokenizer)
    twins = tokens.twins(names)
    if twins:
        dropped = {t.name for t in twins}
        log.warning("names: dropped %d name(s) with the token ids of an earlier one (e.g. %r, the tokens of %r)",
                    len(twins), twins[0].name, twins[0].same_tokens_as)
        names = [n for n in names if n not in dropped]
    person_twins = tokens.twins(persons)
    if person_twins:
        t = person_twins[0]
        raise InputError(f"photos[{t.same_tokens_as!r}] and photos[{t.name!r}] are the same token ids to the model's "
                         "tokenizer, which cannot tell them apart; put their photos under one name")
    name_id = {n: i for i, n in enumerate(names)}
    missing = [p for p in persons if p not in name_id]
    found = tokens.find(missing, names) if missing else {}
    if found:
        p = next(iter(found))
        log.warning("%d person(s) have the token ids of a name spelt otherwise and are scored as that name "
                    "(e.g. %r as %r)", len(found), p, names[found[p]])
    added = [p for p in missing if p not in found]  # query's rule: ids after the names, in person order
    if added:
        log.info("%d attacked person(s) are not among the names and are added as candidates (e.g. %r)",
                 len(added), added[0])
    candidate_id = {**name_id, **found, **{p: len(names) + i for i, p in enumerate(added)}}
    return names, candidate_id, added


def _check_names(names: Sequence[str]) -> list[str]:
    """The names file's rules for a list: NFC, stripped, no control characters, duplicates dropped (warned)."""
    if isinstance(names, str):
        raise InputError(f"names must be a list of names, got the string {names!r}; write [{names!r}]")
    out: list[str] = []
    seen: set[str] = set()
    dropped = 0
    for i, raw in enumerate(names):
        if not isinstance(raw, str):
            raise InputError(f"names[{i}] must be a string (a full name), got {type(raw).__name__}")
        name = normalize_name(raw)
        check_name(name, where=f"names[{i}]")
        if name in seen:
            dropped += 1
            continue
        seen.add(name)
        out.append(name)
    if not out:
        raise InputError("names is empty; give the candidate names (full names, at least one)")
    if dropped:
        log.warning("names: dropped %d duplicate name(s), first occurrence kept", dropped)
    return out


def _check_photos(photos: Mapping[str, Sequence[Photo]]) -> dict[str, list[Photo]]:
    """Persons (normalised names, sorted as query sorts them) -> their photos, checked."""
    if not isinstance(photos, Mapping):
        raise InputError(f"photos must be a dict of person name -> list of photos, got {type(photos).__name__}")
    out: dict[str, list[Photo]] = {}
    key_of: dict[str, str] = {}
    for raw, srcs in photos.items():
        if not isinstance(raw, str):
            raise InputError(f"photos' keys must be person names (strings), got {type(raw).__name__} {raw!r}")
        name = normalize_name(raw)
        check_name(name, where=f"photos[{raw!r}]")
        other = key_of.setdefault(name_key(name), raw)
        if other != raw:
            raise InputError(f"photos[{other!r}] and photos[{raw!r}] name the same person (up to letter case, "
                             "whitespace or Unicode form); merge their photos under one name")
        if isinstance(srcs, (str, Path, Image.Image)) or not isinstance(srcs, Sequence):
            raise InputError(f"photos[{raw!r}] must be a list of paths or PIL images, got {type(srcs).__name__}; "
                             "wrap a single photo in a list")
        for i, src in enumerate(srcs):
            if not isinstance(src, (str, Path, Image.Image)):
                raise InputError(f"photos[{raw!r}][{i}] must be a path (str or Path) or a PIL image, "
                                 f"got {type(src).__name__}")
        out[name] = list(srcs)
    if not out:
        raise InputError("photos is empty; give at least one person: {'Full Name': [photo paths or PIL images]}")
    return dict(sorted(out.items()))


def _check_labels(labels: Mapping[str, bool] | None) -> dict[str, bool] | None:
    if labels is None:
        return None
    if not isinstance(labels, Mapping):
        raise InputError(f"labels must be a dict of person name -> True (member) / False, got {type(labels).__name__}")
    out: dict[str, bool] = {}
    for raw, value in labels.items():
        if not isinstance(raw, str):
            raise InputError(f"labels' keys must be person names (strings), got {type(raw).__name__} {raw!r}")
        if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
            out[normalize_name(raw)] = bool(value)
        else:
            raise InputError(f"labels[{raw!r}] must be True (member) or False (non-member), got {value!r}")
    return out
