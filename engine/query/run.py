"""`query`: embed each person's photos, search every template's name index, decide membership.

Stages (each timed, each reporting progress):
1. inputs   - open the index, find the images, read labels; everything is validated before any model work
2. hash     - SHA-256 of every selected image file (the store key)
3. encode   - images not yet in the LMDB store are decoded (DataLoader workers), encoded and committed
              one batch per transaction; a rerun encodes nothing it already stored
4. search   - per template, image embeddings are streamed from the store in bounded chunks and searched
              (top-k); names of queried people missing from the index are scored exactly beside it
5. decide   - paper mode: unique plurality per template, score 0..T, member iff score >= tau
6. report   - persons.csv, modes.csv, predictions/, summary.json, run.json, swapped in atomically

Killed at any point (kill -9 included), a rerun with the same arguments gives a byte-identical report
except run.json (timings, what was encoded now vs found in the store): encode batches are formed from
the images not yet in the store, in a fixed order, and each batch commits its embeddings and its
undecodable files in one transaction, so the rerun's batches are exactly the ones the first run had
not committed, and every image is embedded in the same batch as it would have been.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from idia_engine.indexes import Exactness, search_exact, sort_topk

from ..disk.atomic import staged_directory
from ..disk.faults import fault_point
from ..disk.versions import library_versions, utc_now
from ..errors import InputError
from ..index.build import (
    DEFAULT_STORE_NAME,
    ENSEMBLE_KIND,
    NameIndex,
    encode_name_prompts,
    open_index,
)
from ..model.load import DeviceChoice, LoadedModel, Precision, load_model
from ..progress import Progress, no_progress
from .images import (
    ImageCollection,
    ImageDataset,
    Skipped,
    collate_images,
    collect_from_csv,
    collect_from_folder,
    hash_images,
)
from .labels import read_labels
from .metrics import confusion_metrics
from .report import (
    FILE_DESCRIPTIONS,
    PREDICTIONS,
    REPORT_ARTIFACT,
    REPORT_SCHEMA_VERSION,
    check_report_dir,
    write_images_csv,
    write_modes,
    write_persons,
    write_run,
    write_summary,
)
from .store import EmbeddingStore
from .votes import PaperModeVotes, paper_mode_votes

log = logging.getLogger(__name__)


ENSEMBLE_CANDIDATES = 256  # names kept by the ensemble prefilter per image (--search-param candidates=K)


@dataclass(frozen=True)
class QueryConfig:
    """Everything `run_query` needs."""

    index_dir: Path  # an index built by build-index
    faces_dir: Path | None = None  # faces/<Person Name>/<images>; or give image_manifest
    image_manifest: Path | None = None  # CSV path,name (paths relative to the CSV)
    out_dir: Path = Path("idia-report")  # the report directory (replaced if it holds an earlier report)
    store_dir: Path | None = None  # LMDB embedding store; None = <index_dir>/image-store
    labels_file: Path | None = None  # CSV name,member
    top_k: int = 10  # candidates kept per image and template
    tau: int = 1  # member iff score >= tau
    images_per_person: int | None = None  # use a random subset of this size per person (None = all)
    seed: int = 0  # seeds the subset choice
    strict: bool = False  # error (instead of adding them) when queried names are missing from the index
    device: DeviceChoice = DeviceChoice.AUTO
    precision: Precision = Precision.FP32  # forward-pass precision of the image encoder
    batch_size: int = 64  # images per forward pass (= per store transaction)
    workers: int = 0  # DataLoader worker processes decoding images (0 = in the main process)
    store_dtype: str = "float32"  # how embeddings are stored: float32 or float16
    search_chunk: int = 4096  # image embeddings read from the store and searched at once
    search_params: dict | None = None  # per-call index parameters (e.g. {"nprobe": 64}); default: the manifest's
    exact_fallback: bool = True  # approximate kinds: brute-force what cannot be certified (False: flag it)


@dataclass(frozen=True)
class QueryResult:
    out_dir: Path
    summary: dict  # what summary.json holds
    run: dict  # what run.json holds: this run's timings and encode counts


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 4)


def _validate(config: QueryConfig) -> None:
    if (config.faces_dir is None) == (config.image_manifest is None):
        raise InputError("give either a faces folder or --manifest images.csv (exactly one)")
    checks = [("--top-k", config.top_k, 1), ("--batch-size", config.batch_size, 1), ("--tau", config.tau, 0),
              ("--workers", config.workers, 0), ("--search-chunk", config.search_chunk, 1)]
    for flag, value, low in checks:
        if value < low:
            raise InputError(f"{flag} must be >= {low}, got {value}")
    if config.images_per_person is not None and config.images_per_person < 1:
        raise InputError(f"--images-per-person must be >= 1, got {config.images_per_person}")
    if config.store_dtype not in ("float32", "float16"):
        raise InputError(f"--store-dtype must be float32 or float16, got {config.store_dtype!r}")
    check_report_dir(config.out_dir)


def select_images(collection: ImageCollection, n: int | None, seed: int) -> dict[str, list[Path]]:
    """Per person, all images or a seeded random subset of n (without replacement, kept in path order).

    Each person's draw depends only on (seed, name), not on which other people are queried.
    """
    if n is None:
        return collection.persons
    out = {}
    for name, paths in collection.persons.items():
        if len(paths) <= n:
            out[name] = paths
            continue
        name_key = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
        rng = np.random.default_rng([seed, name_key])
        out[name] = [paths[i] for i in sorted(rng.choice(len(paths), size=n, replace=False))]
    return out


def image_fingerprint(model: LoadedModel) -> str:
    """Store namespace of a model's image embeddings: the weights and the forward-pass precision."""
    return hashlib.sha256(f"{model.info.fingerprint}|image|{model.precision.value}".encode()).hexdigest()


def _encode_missing(model: LoadedModel, store: EmbeddingStore, ns, items: list[tuple[Path, str]], config: QueryConfig,
                    progress: Progress) -> tuple[int, dict[str, str]]:
    """Encode the (path, sha) items not yet stored; return (encoded count, {sha: why it did not decode})."""
    dataset = ImageDataset(items, model.preprocess)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, num_workers=config.workers,
                                         collate_fn=collate_images, shuffle=False)
    encoded, failed, done = 0, {}, 0
    progress("encode images", 0, len(items))
    for pixels, shas, bad in loader:
        failed.update(bad)
        emb = model.encode_images(pixels) if pixels is not None else np.zeros((0, ns.dim), np.float32)
        # One committed transaction per batch: its embeddings and its undecodable files together.
        store.put_many(ns, shas, emb, failures=bad)
        fault_point("query.encode.committed")
        encoded += len(shas)
        done += len(shas) + len(bad)
        progress("encode images", done, len(items))
    return encoded, failed


def run_query(config: QueryConfig, progress: Progress = no_progress, model: LoadedModel | None = None) -> QueryResult:
    """Run the attack in paper mode and write the report; see the module docstring."""
    timer = _Timer()
    with timer.stage("inputs"):
        _validate(config)
        index: NameIndex = open_index(config.index_dir)  # pins its data generation until the run ends
        fault_point("query.index.opened")
        templates = index.templates
        if config.tau > len(templates):
            raise InputError(f"--tau {config.tau} exceeds the number of templates ({len(templates)})")
        collection = (collect_from_folder(config.faces_dir) if config.faces_dir is not None
                      else collect_from_csv(config.image_manifest))
        labels = read_labels(config.labels_file) if config.labels_file is not None else None
        selected = select_images(collection, config.images_per_person, config.seed)
        persons = list(selected)
        missing = [p for p in persons if index.name_id(p) is None]
        if missing and config.strict:
            raise InputError(
                f"{len(missing)} queried name(s) are not in index {config.index_dir} (e.g. {missing[0]!r}); "
                "add them to the names file and rebuild, or drop --strict to add them for this run"
            )

    with timer.stage("load model"):
        if model is None:
            model = load_model(index.manifest.model_info.as_spec(), config.device, config.precision)
        index.check_model(model.info)

    store_dir = Path(config.store_dir) if config.store_dir is not None else Path(config.index_dir) / DEFAULT_STORE_NAME
    skipped: list[Skipped] = list(collection.skipped)
    with index, EmbeddingStore(store_dir) as store:
        ns = store.namespace(image_fingerprint(model), model.info.embed_dim, config.store_dtype,
                             model=f"{model.info.model} ({model.info.pretrained}), {model.precision.value}")
        with timer.stage("hash"):
            flat = [(name, path) for name in persons for path in selected[name]]
            progress("hash images", 0, len(flat))
            shas, unreadable = hash_images([p for _, p in flat])
            progress("hash images", len(flat), len(flat))
            skipped += unreadable
        with timer.stage("encode images"):
            readable = [(path, sha) for (_, path), sha in zip(flat, shas) if sha is not None]
            unique: dict[str, Path] = {}
            for path, sha in readable:
                unique.setdefault(sha, path)
            cached = store.contains(ns, list(unique))
            known_bad = store.failures(ns, [sha for sha, hit in zip(unique, cached) if not hit])
            todo = [(path, sha) for (sha, path), hit in zip(unique.items(), cached)
                    if not hit and sha not in known_bad]
            if todo:
                store.require_writable(len(todo))  # before any encoding: a read-only store fails here
            encoded, undecodable = _encode_missing(model, store, ns, todo, config, progress)
            undecodable.update(known_bad)
            # A file whose bytes do not decode is skipped, and so is every other file with the same bytes.
            skipped += [Skipped(str(p), undecodable[sha]) for (_, p), sha in zip(flat, shas) if sha in undecodable]
        rows = [(name, path, sha) for (name, path), sha in zip(flat, shas) if sha is not None and sha not in undecodable]
        person_index = {name: i for i, name in enumerate(persons)}
        images_used = np.bincount([person_index[n] for n, _, _ in rows], minlength=len(persons))

        with timer.stage("encode missing names"):
            extra_names = missing  # scored exactly beside the index, ids after the index's names
            extra_emb = encode_name_prompts(model, templates, extra_names) if extra_names else None
        candidates = index.names + extra_names
        k = min(config.top_k, len(candidates))

        with staged_directory(Path(config.out_dir), replace_existing=True) as tmp:
            pred_dir = tmp / PREDICTIONS
            pred_dir.mkdir()
            with timer.stage("search"):
                ids_mm = np.lib.format.open_memmap(pred_dir / "topk_ids.npy", mode="w+", dtype=np.int32,
                                                   shape=(len(rows), len(templates), k))
                scores_mm = np.lib.format.open_memmap(pred_dir / "topk_scores.npy", mode="w+", dtype=np.float32,
                                                      shape=(len(rows), len(templates), k))
                search_stats = _search(index, store, ns, [sha for _, _, sha in rows], extra_emb, k,
                                       model.device.type == "cuda", config.search_chunk, ids_mm, scores_mm, progress,
                                       config.search_params, config.exact_fallback)
                top1 = np.array(ids_mm[:, :, 0], dtype=np.int64)
                ids_mm.flush()
                scores_mm.flush()
                del ids_mm, scores_mm

            with timer.stage("decide"):
                candidate_id = {name: len(index.names) + i for i, name in enumerate(extra_names)}
                true_ids = np.array([candidate_id[p] if p in candidate_id else index.name_id(p) for p in persons],
                                    np.int64)
                votes = paper_mode_votes(top1, np.array([person_index[n] for n, _, _ in rows], np.int64), true_ids)
                decisions = votes.decisions(config.tau)
                metrics, label_info = _metrics(persons, votes, decisions, labels)

            with timer.stage("write report"):
                in_index = np.array([index.name_id(p) is not None for p in persons])
                write_persons(tmp / "persons.csv", persons, votes, decisions, labels, in_index)
                write_modes(tmp / "modes.csv", persons, votes, candidates)
                write_images_csv(pred_dir / "images.csv", [(n, str(p), s) for n, p, s in rows])
                (pred_dir / "candidates.txt").write_text("".join(c + "\n" for c in candidates), encoding="utf-8")
                summary = _summary(config, index, model, store_dir, collection, persons, images_used, rows, skipped,
                                   extra_names, votes, decisions, metrics, label_info, k)
                summary["search"] = search_stats
                write_summary(tmp, summary)
                run = {"created_at": utc_now(), "images_encoded": encoded,
                       "images_from_cache": len(unique) - len(todo) - len(known_bad),
                       "undecodable_from_store": len(known_bad), "timings_s": dict(timer.seconds)}
                write_run(tmp, run)
            fault_point("query.report.staged")
        run["timings_s"] = timer.seconds  # includes the final swap; the file has all but that
    return QueryResult(Path(config.out_dir), summary, run)


def _search(index: NameIndex, store: EmbeddingStore, ns, shas: list[str], extra_emb: np.ndarray | None, k: int,
            use_gpu: bool, chunk: int, ids_out: np.ndarray, scores_out: np.ndarray, progress: Progress,
            search_params: dict | None = None, fallback: bool = True) -> dict:
    """Fill ids_out/scores_out [M, T, k] with each image's top-k candidates per template; return counts.

    Exact kinds (flat, dense) answer exactly. Approximate kinds go through `search_exact`: candidates from
    the index, exact re-rank against the template's raw vectors, a certificate that no other name can beat
    the winner, and brute force for the uncertified (or, with fallback=False, a flag).
    """
    n_templates = len(index.templates)
    total = len(shas) * n_templates
    exact_kind = index.exact
    params = {**index.manifest.search_params, **(search_params or {})}
    stats = {"index_kind": index.manifest.index_kind, "search_params": params, "predictions": total,
             "exact_by_index": total if exact_kind else 0, "certified": 0, "fell_back": 0, "uncertified_kept": 0}
    progress("search", 0, total)
    if index.manifest.index_kind == ENSEMBLE_KIND:
        _search_ensemble(index, store, ns, shas, extra_emb, k, chunk, ids_out, scores_out, progress, params,
                         fallback, stats)
        stats["exact_decisions"] = stats["uncertified_kept"] == 0
        return stats
    done = 0
    for t in range(n_templates):
        backend = index.load_template(t, use_gpu=use_gpu)
        vectors = None if exact_kind else index.vectors(t)
        for start, queries in store.iter_embeddings(ns, shas, chunk):
            if exact_kind:
                scores, ids = backend.search(queries, k, params or None)
            else:
                res = search_exact(backend, vectors, queries, k, params or None, fallback, need=Exactness.TOP1)
                scores, ids = res.scores, res.ids
                stats["certified"] += int(res.certified.sum())
                stats["fell_back"] += int(res.fell_back.sum())
                stats["uncertified_kept"] += int((~res.certified & ~res.fell_back).sum())
            scores, ids = _merge_extra(index, t, queries, scores, ids, extra_emb, k)
            ids_out[start:start + len(queries), t] = ids
            scores_out[start:start + len(queries), t] = scores
            done += len(queries)
            progress("search", done, total)
            fault_point("query.search.chunk")
        del backend, vectors
    stats["exact_decisions"] = stats["uncertified_kept"] == 0
    return stats


def _merge_extra(index: NameIndex, t: int, queries: np.ndarray, scores: np.ndarray, ids: np.ndarray,
                 extra_emb: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Names added for this run are scored exactly and merged into the top-k."""
    if extra_emb is None:
        return scores, ids
    extra_scores = queries @ extra_emb[t].T
    extra_ids = np.broadcast_to(np.arange(len(index.names), len(index.names) + extra_emb.shape[1]),
                                extra_scores.shape)
    scores, ids = sort_topk(np.concatenate([scores, extra_scores], 1), np.concatenate([ids, extra_ids], 1))
    return scores[:, :k], ids[:, :k]


def _search_ensemble(index: NameIndex, store: EmbeddingStore, ns, shas: list[str], extra_emb, k: int, chunk: int,
                     ids_out: np.ndarray, scores_out: np.ndarray, progress: Progress, params: dict, fallback: bool,
                     stats: dict) -> None:
    """The template-ensemble prefilter: one search over the names' means per image, exact re-rank per template."""
    ensemble = index.ensemble()
    sources = [index.vectors(t) for t in range(len(index.templates))]
    candidates = int(params.get("candidates", ENSEMBLE_CANDIDATES))
    done = 0
    for start, queries in store.iter_embeddings(ns, shas, chunk):
        res = ensemble.search(queries, sources, k, candidates=candidates, fallback=fallback)
        stats["certified"] += int(res.certified.sum())
        stats["fell_back"] += int(res.fell_back.sum())
        stats["uncertified_kept"] += int((~res.certified & ~res.fell_back).sum())
        for t in range(len(index.templates)):
            scores, ids = _merge_extra(index, t, queries, res.scores[:, t], res.ids[:, t], extra_emb, k)
            ids_out[start:start + len(queries), t] = ids
            scores_out[start:start + len(queries), t] = scores
        done += len(queries) * len(index.templates)
        progress("search", done, len(shas) * len(index.templates))
        fault_point("query.search.chunk")


def _metrics(persons: list[str], votes: PaperModeVotes, decisions: np.ndarray, labels: dict[str, bool] | None):
    if labels is None:
        return None, None
    decided = [i for i, p in enumerate(persons) if p in labels and votes.n_images[i] > 0]
    info = {
        "labelled_persons": len(decided),
        "unlabelled_persons": sorted(p for p in persons if p not in labels),
        "labelled_without_images": sorted(p for i, p in enumerate(persons) if p in labels and votes.n_images[i] == 0),
        "labels_for_unknown_names": sorted(set(labels) - set(persons)),
    }
    if info["labels_for_unknown_names"]:
        log.warning("labels name %d person(s) that were not queried (e.g. %r)",
                    len(info["labels_for_unknown_names"]), info["labels_for_unknown_names"][0])
    idx = np.array(decided, np.int64)
    members = np.array([labels[persons[i]] for i in decided], bool)
    return confusion_metrics(decisions[idx] if len(idx) else np.zeros(0, bool), members), info


def _summary(config, index, model, store_dir, collection, persons, images_used, rows, skipped,
             extra_names, votes, decisions, metrics, label_info, k) -> dict:
    """summary.json: a function of the inputs and arguments alone (what varies per run goes to run.json)."""
    has_images = images_used > 0
    requested = config.images_per_person
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "artifact": REPORT_ARTIFACT,
        "mode": "paper",
        "parameters": {
            "source": collection.source, "index_dir": str(config.index_dir), "store_dir": str(store_dir),
            "labels_file": str(config.labels_file) if config.labels_file else None,
            "top_k": config.top_k, "tau": config.tau, "images_per_person": requested, "seed": config.seed,
            "strict": config.strict, "device": str(model.device), "precision": model.precision.value,
            "batch_size": config.batch_size, "workers": config.workers, "store_dtype": config.store_dtype,
        },
        "index": {"build_id": index.manifest.build_id, "index_kind": index.manifest.index_kind,
                  "num_names": index.manifest.num_names, "num_templates": index.manifest.num_templates,
                  "names_sha256": index.manifest.names_sha256},
        "model": {"model": model.info.model, "pretrained": model.info.pretrained,
                  "weights_source": model.info.weights_source, "fingerprint": model.info.fingerprint},
        "counts": {
            "persons": len(persons),
            "persons_with_images": int(has_images.sum()),
            "images_found": sum(len(v) for v in collection.persons.values()),
            "images_used": len(rows),
            "images_skipped": len(skipped),
            "candidates": len(index.names) + len(extra_names),
            "candidates_added_for_this_run": len(extra_names),
            "top_k": k,
            "persons_below_requested_images": int((images_used < requested).sum()) if requested else 0,
            "decided_member": int((decisions & has_images).sum()),
            "decided_non_member": int((~decisions & has_images).sum()),
        },
        "candidates_added_for_this_run": extra_names,
        "persons_without_images": [p for p, n in zip(persons, images_used) if n == 0],
        "skipped_files": [asdict(s) for s in sorted(skipped, key=lambda s: s.path)],
        "metrics": metrics,
        "labels": label_info,
        "files": FILE_DESCRIPTIONS,
        "library_versions": library_versions(),
    }
