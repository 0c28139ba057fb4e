"""`query`: embed each person's photos, search every template's name index, decide membership.

Stages, one function each below (each timed, each reporting progress):
1. inputs   - open the index, find the images, read labels; everything is validated before any model work
              (several faces folders, --aliases, --faces-list and --crop: `inputs/`)
2. hash     - SHA-256 of every photo drawn (the store key); per person, files with the same bytes are one
              photo (the first listed is kept, the others are reported in summary.json's duplicate_photos)
3. encode   - images not yet in the LMDB store are read once, checked against their hash, decoded (EXIF
              orientation applied; DataLoader workers), encoded and committed one batch per transaction; a
              rerun encodes nothing it already stored
4. search   - per template, image embeddings are streamed from the store in bounded chunks and searched
              (top-k, `search.py`); names of queried people missing from the index are scored beside it;
              approximate kinds then settle each (person, template) cell by witnesses and brute-force only
              the photos open cells need (`settle.py`, `cells.py`)
5. decide   - paper mode (`votes.py`): unique plurality per template, score 0..T, member iff score >= tau
6. report   - persons.csv, modes.csv, predictions/, summary.json, run.json, swapped in atomically

Stages 4-6 take (image rows, their embeddings) whatever computed them (`score_rows`): `query --embeddings`
(`interop/query_embeddings.py`) reads the rows from a folder in clip-retrieval's layout instead of stages 2-3.

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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from idia_engine.indexes.gpu import GPU_MAX_K

from ..candidates.identity import NameTokens
from ..candidates.prompt_lengths import check_prompt_lengths
from ..disk.atomic import check_output_placement, staged_directory
from ..disk.faults import fault_point
from ..disk.space import allocate_npy, require_free_space
from ..disk.textfiles import check_finite_number, check_whole_number
from ..disk.versions import utc_now
from ..errors import InputError
from ..index.encode import encode_name_prompts
from ..index.layout import DEFAULT_STORE_NAME
from ..index.reader import NameIndex, open_index
from ..interop.embeddings import EmbeddingsInput
from ..model.load import DeviceChoice, LoadedModel, Precision, load_model
from ..progress import Progress, no_progress
from .cells import EXACT_STATUSES
from .images import (
    DECODE_VERSION,
    DuplicatePhoto,
    ImageCollection,
    ImageDataset,
    Skipped,
    choose_photos,
    collate_for_store,
    collect_from_csv,
    collect_from_folder,
)
from .inputs import PhotoInputs, collect_photo_inputs, uses_photo_inputs
from .inputs.crop import CROPS_CSV, CropPlan, crop_fingerprint
from .labels import read_labels
from .metrics import label_metrics
from .report import (
    PREDICTIONS,
    TOP1_STATUS,
    build_summary,
    check_report_dir,
    write_images_csv,
    write_modes,
    write_persons,
    write_run,
    write_summary,
    write_topk_tables,
)
from .search import QueryEmbeddings, SearchJob, StoredEmbeddings, search_all, status_counts
from .settle import settle_cells
from .store import EmbeddingStore, Namespace
from .votes import PaperModeVotes, check_tau, paper_mode_votes

log = logging.getLogger(__name__)


MAX_TOP_K = GPU_MAX_K  # candidates kept per image and template (faiss on a GPU selects at most 2048)
MAX_BATCH = 65536  # images per forward pass
MAX_WORKERS = 1024  # DataLoader decoding processes


@dataclass(frozen=True)
class QueryConfig:
    """Everything `run_query` needs; checked when made (tau, whose range 1..T depends on the index, when the
    index is opened: `check_tau`)."""

    index_dir: Path  # an index built by build-index
    faces_dir: Path | None = None  # faces/<Person Name>/<images>; or give image_manifest
    extra_faces_dirs: tuple[Path, ...] = ()  # more faces folders after faces_dir; a person in several is merged
    aliases_file: Path | None = None  # CSV alias,name: folder, faces-list and label names read as other names
    faces_list: Path | None = None  # FaceScrub-style list (name, image_id, face_id, url, bbox, sha256)
    crop: bool = False  # with faces_list: each photo is its face box (default: the whole file, as the paper)
    image_manifest: Path | None = None  # CSV path,name (paths relative to the CSV)
    out_dir: Path = Path("idia-report")  # the report directory (replaced if it holds an earlier report)
    store_dir: Path | None = None  # LMDB embedding store; None = <index_dir>/image-store
    labels_file: Path | None = None  # CSV name,member
    top_k: int = 10  # candidates kept per image and template
    tau: int = 1  # member iff score >= tau (1..T)
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
    cells: bool = True  # approximate kinds: settle cells by witnesses, brute-force only what they leave open
    command_line: str | None = None  # how this run was started (the CLI fills it in), recorded in run.json
    # instead of photos: their embeddings, computed elsewhere, in clip-retrieval's layout (`interop/`)
    embeddings: EmbeddingsInput | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.faces_dir, self.image_manifest, self.embeddings)) != 1:
            raise InputError("give either a faces folder, --manifest images.csv or --embeddings DIR (exactly one)")
        if self.embeddings is not None and self.images_per_person is not None:
            raise InputError("--images-per-person draws photos by their bytes; with --embeddings every row is used "
                             "(choose the rows in the folder instead)")
        if self.embeddings is not None and (self.aliases_file or self.faces_list or self.crop):
            raise InputError("--aliases, --faces-list and --crop read photo files; --embeddings has none (name each "
                             "row's person in its metadata instead)")
        _check_photo_options(self)
        # (option, value, lowest, highest or None, why the cap): every cap bounds a cost the user chooses.
        checks = [("--top-k", self.top_k, 1, MAX_TOP_K, ("faiss's GPU k-selection limit; predictions/ keeps "
                                                          "images x templates x k ids and scores")),
                  ("--seed", self.seed, 0, None, ""),
                  ("--batch-size", self.batch_size, 1, MAX_BATCH, "a forward pass holds that many decoded photos"),
                  ("--workers", self.workers, 0, MAX_WORKERS, "decoding processes"),
                  ("--search-chunk", self.search_chunk, 1, None, "")]
        if self.images_per_person is not None:
            checks.append(("--images-per-person", self.images_per_person, 1, None, ""))
        for option, value, low, high, why in checks:
            check_whole_number(option, value, low, high, why)
        if self.store_dtype not in ("float32", "float16"):
            raise InputError(f"--store-dtype must be float32 or float16, got {self.store_dtype!r}")
        for key, value in (self.search_params or {}).items():
            if not isinstance(key, str) or not key.isidentifier():
                raise InputError(f"--search-param name {key!r} is not a parameter name like nprobe or efSearch")
            if not isinstance(value, bool):
                check_finite_number(f"--search-param {key}", value, 0, valid="a finite number >= 0 (or true/false)")
        # Where the report goes: never in, over or around an input (check_output_placement says why each).
        inputs = [("faces folder", self.faces_dir), ("index dir", self.index_dir), ("embedding store", self.store_path),
                  ("labels file", self.labels_file), ("image manifest", self.image_manifest),
                  ("embeddings folder", self.embeddings.folder if self.embeddings is not None else None)]
        inputs += [("faces folder", d) for d in self.extra_faces_dirs]
        inputs += [("aliases file", self.aliases_file), ("faces list", self.faces_list)]
        check_output_placement(Path(self.out_dir), "--out", inputs)
        for faces in self.faces_roots:  # anything inside a faces folder is read as a person
            check_output_placement(Path(self.index_dir), "--index-dir", [("faces folder", faces)])
            if self.store_dir is not None:
                check_output_placement(Path(self.store_dir), "--store", [("faces folder", faces)])

    @property
    def store_path(self) -> Path:
        return Path(self.store_dir) if self.store_dir is not None else Path(self.index_dir) / DEFAULT_STORE_NAME

    @property
    def faces_roots(self) -> list[Path]:
        """Every faces folder given, in order (none with image_manifest)."""
        return [] if self.faces_dir is None else [Path(self.faces_dir), *map(Path, self.extra_faces_dirs)]


def _check_photo_options(config: QueryConfig) -> None:
    """The options of `inputs/`: which go together, and faces folders that are neither repeated nor nested."""
    if config.extra_faces_dirs and config.faces_dir is None:
        raise InputError("several faces folders need a first one (faces_dir); --manifest takes no faces folder")
    if config.crop and config.faces_list is None:
        raise InputError("--crop needs --faces-list, which gives the face boxes to crop to")
    roots = config.faces_roots
    for i, a in enumerate(roots):
        for b in roots[i + 1:]:
            real_a, real_b = a.resolve(), b.resolve()
            if real_a == real_b:
                raise InputError(f"faces folder {b} is given twice ({a}); give each folder once")
            if real_a.is_relative_to(real_b) or real_b.is_relative_to(real_a):
                inner, outer = (a, b) if real_a.is_relative_to(real_b) else (b, a)
                raise InputError(f"faces folder {inner} lies inside faces folder {outer}, whose person folders it "
                                 "would be read as; give folders side by side")


@dataclass(frozen=True)
class QueryResult:
    out_dir: Path
    summary: dict  # what summary.json holds
    run: dict  # what run.json holds: this run's timings and encode counts


@dataclass(frozen=True)
class QueryInputs:
    """Stage 1: the opened index and the people and photos to query."""

    index: NameIndex  # pins its data generation until the run ends
    collection: ImageCollection  # every person's photos found, and what was skipped while finding them
    labels: dict[str, bool] | None
    missing: list[str]  # queried names not in the index: scored exactly beside it for this run
    # person -> the index name with the same token ids in the model's tokenizer (`Anna  Smith` -> `Anna Smith`):
    # the model cannot tell them apart, so the person is that index entry, not a name added beside it
    same_tokens: dict[str, str] = field(default_factory=dict)
    added_prompt_lengths: dict | None = None  # the build-time prompt-length check, run on the added names
    photo_inputs: PhotoInputs | None = None  # several faces folders, aliases or a faces list (None: one source)

    @property
    def persons(self) -> list[str]:
        return list(self.collection.persons)

    def index_id(self, person: str) -> int | None:
        """The index row of a person's true name (matched by tokens where the spelling differs), or None."""
        found = self.index.name_id(person)
        return found if found is not None else self.index.name_id(self.same_tokens.get(person, person))


@dataclass(frozen=True)
class SharedPhoto:
    """The same bytes among the photos of several persons: not a duplicate (each person's copy votes), but
    worth a look (a photo filed under the wrong person?)."""

    sha256: str  # the bytes
    persons: list[str]  # who has them, in report order
    paths: list[str]  # the file of each of them


@dataclass(frozen=True)
class HashedImages:
    """Stage 2: every chosen photo with its content hash (None: unreadable, then in `skipped`)."""

    flat: list[tuple[str, Path]]  # (person, photo) in report order: per person distinct by content
    shas: list[str | None]
    skipped: list[Skipped]
    duplicates: list[DuplicatePhoto]  # files left out as copies of another photo of the same person
    shared: list[SharedPhoto]  # photos whose bytes appear under more than one person (all kept)


@dataclass(frozen=True)
class EncodeOutcome:
    """Stage 3: what the store now holds for this run, and what this run added."""

    encoded: int  # images encoded now
    from_cache: int  # distinct images found in the store
    known_bad: int  # distinct images the store already knew not to decode
    undecodable: dict[str, str]  # sha -> why that content does not decode (now or before)
    unread: dict[str, tuple[Path, str]]  # sha -> (the file, why its read failed now): not stored, retried next run


@dataclass(frozen=True)
class RowsToScore:
    """What stages 4-6 take, however the embeddings were obtained: the image rows in report order (person,
    photo, sha256), their embeddings (row m = image m), and what the report says about the photos left out."""

    rows: list[tuple[str, Path, str]]
    images: QueryEmbeddings
    skipped: list[Skipped]
    duplicates: list[DuplicatePhoto] = field(default_factory=list)
    shared: list[SharedPhoto] = field(default_factory=list)


@dataclass(frozen=True)
class Decision:
    """Stage 5: the vote and what follows from it."""

    votes: PaperModeVotes
    decisions: np.ndarray  # bool [P]: member iff score >= tau
    metrics: dict | None  # confusion metrics against the labels (None without labels)
    label_info: dict | None  # who was labelled, queried, left out
    votes_exact: np.ndarray  # bool [P, T]: every photo's top-1 in the cell is exact, so are its vote counts


@dataclass
class StageTimer:
    """Seconds per named stage of a run (run.json's timings_s)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 4)


def run_query(config: QueryConfig, progress: Progress = no_progress, model: LoadedModel | None = None) -> QueryResult:
    """Run the attack in paper mode and write the report; see the module docstring. With `config.embeddings`,
    the photos' embeddings are read from that folder instead of computed (`interop.query_embeddings`)."""
    if config.embeddings is not None:
        from ..interop.query_embeddings import run_embeddings_query  # it builds on this module's stages

        return run_embeddings_query(config, progress, model)
    timer = StageTimer()
    with timer.stage("inputs"):
        inputs = _read_inputs(config)
    with timer.stage("load model"):
        if model is None:
            model = load_model(inputs.index.manifest.model_info.as_spec(), config.device, config.precision)
        inputs.index.check_model(model.info)
    with timer.stage("match names"):
        inputs = match_names(inputs, model, config)
    _require_space(inputs, model, config)
    with inputs.index, EmbeddingStore(config.store_path) as store:
        crops = inputs.photo_inputs.crops if inputs.photo_inputs is not None else None
        fingerprint = image_fingerprint(model) if crops is None else crop_fingerprint(image_fingerprint(model))
        ns = store.namespace(fingerprint, model.info.embed_dim, config.store_dtype,
                             model=f"{model.info.model} ({model.info.pretrained}), {model.precision.value}"
                             + ("" if crops is None else ", face crops"))
        with timer.stage("hash"):
            hashed = _hash(inputs, config, progress)
        with timer.stage("encode images"):
            encoded = _encode(model, store, ns, hashed, config, progress, crops)
        skipped = hashed.skipped + _skipped_by_encode(hashed, encoded)
        rows = [(name, path, sha) for (name, path), sha in zip(hashed.flat, hashed.shas)
                if sha is not None and sha not in encoded.undecodable and sha not in encoded.unread]
        images = StoredEmbeddings(store, ns, [sha for _, _, sha in rows])
        found = RowsToScore(rows, images, skipped, hashed.duplicates, hashed.shared)
        summary, run = score_rows(config, inputs, model, found, timer, progress,
                                  {"images_encoded": encoded.encoded, "images_from_cache": encoded.from_cache,
                                   "undecodable_from_store": encoded.known_bad})
    return QueryResult(Path(config.out_dir), summary, run)


def score_rows(config: QueryConfig, inputs: QueryInputs, model: LoadedModel, found: RowsToScore, timer: StageTimer,
               progress: Progress, run_counts: dict, summary_extra: dict | None = None) -> tuple[dict, dict]:
    """Stages 4-6 over embedded image rows: search every template, vote, write the report (staged, swapped in
    whole); returns (summary.json's content, run.json's). `run_counts` are run.json's counts of where the
    embeddings came from; `summary_extra` adds sections to summary.json. Runs inside the index's `with`."""
    rows = found.rows
    with timer.stage("encode missing names"):
        # Scored exactly beside the index, with ids after the index's names.
        extra_emb = encode_name_prompts(model, inputs.index.templates, inputs.missing) if inputs.missing else None
    person, true_ids = _person_ids(inputs, rows)
    with staged_directory(Path(config.out_dir), replace_existing=True) as tmp:
        with timer.stage("search"):
            top1, status, search_stats = _search(inputs.index, found.images, rows, extra_emb, model, config, tmp,
                                                 person, true_ids, progress)
        with timer.stage("decide"):
            decision = _decide(inputs, person, true_ids, top1, status, config.tau)
        with timer.stage("write report"):
            summary = _write_report(tmp, config, inputs, model, found, decision, search_stats, summary_extra)
            run = {"created_at": utc_now(), "command_line": config.command_line, **run_counts,
                   "timings_s": dict(timer.seconds)}
            write_run(tmp, run)
        fault_point("query.report.staged")
    run["timings_s"] = timer.seconds  # includes the final swap; the file has all but that
    return summary, run


def _read_inputs(config: QueryConfig) -> QueryInputs:
    """Stage 1. Everything that can be wrong with the inputs is found here, before the model loads."""
    check_report_dir(config.out_dir)
    index = open_index(config.index_dir)
    fault_point("query.index.opened")
    check_tau(config.tau, len(index.templates))
    photo_inputs = None
    if uses_photo_inputs(config.faces_roots, config.aliases_file, config.faces_list):
        photo_inputs = collect_photo_inputs(config.faces_roots, config.aliases_file, config.faces_list, config.crop)
        collection = photo_inputs.collection
    else:
        collection = (collect_from_folder(config.faces_dir) if config.faces_dir is not None
                      else collect_from_csv(config.image_manifest))
    labels = read_labels(config.labels_file) if config.labels_file is not None else None
    if photo_inputs is not None:
        labels = photo_inputs.labels(labels, config.labels_file)
    return QueryInputs(index, collection, labels, [p for p in collection.persons if index.name_id(p) is None],
                       photo_inputs=photo_inputs)


def _require_space(inputs: QueryInputs, model: LoadedModel, config: QueryConfig) -> None:
    """Refuse, in one line, a store or report whose disk cannot hold what this run writes (an estimate from
    the photos found: their embeddings, twice for LMDB's pages, and the report's arrays and tables), before
    anything is opened: LMDB and numpy map their files, and a mapped page with no room is a SIGBUS."""
    photos = sum(len(v) for v in inputs.collection.persons.values())
    width = 2 if config.store_dtype == "float16" else 4
    require_free_space(Path(config.store_path), 2 * photos * model.info.embed_dim * width, "the embedding store")
    require_report_space(inputs, config, photos)


def require_report_space(inputs: QueryInputs, config: QueryConfig, photos: int) -> None:
    """Refuse, in one line, a report whose disk cannot hold the predictions of `photos` images."""
    k = min(config.top_k, len(inputs.index.names) + len(inputs.missing))
    per_prediction = 9 + 160  # the arrays (int32 id, float32 cosine, int8 status) and a topk.csv/parquet row
    require_free_space(Path(config.out_dir).parent, photos * len(inputs.index.templates) * k * per_prediction,
                       "the report")


def match_names(inputs: QueryInputs, model: LoadedModel, config: QueryConfig) -> QueryInputs:
    """Persons matched to index names by what the model sees: the token ids of the name in its tokenizer
    (`candidates/identity.py`), not the string. Two persons with the same tokens are an error (the model
    cannot tell them apart); a person with the tokens of an index name is that entry (a warning says so);
    only the rest are added for this run, and they get build-index's prompt-length checks. Runs once the
    model's tokenizer is loaded, before anything is opened for writing."""
    tokens, index = NameTokens(model.tokenizer), inputs.index
    twins = tokens.twins(inputs.persons)
    if twins:
        t = twins[0]
        raise InputError(f"{inputs.collection.source}: persons {t.same_tokens_as!r} and {t.name!r} are the same "
                         f"token ids to the tokenizer of model {model.info.model}, which cannot tell them apart; "
                         "put their photos under one name")
    found = tokens.find(inputs.missing, index.names) if inputs.missing else {}
    same = {p: index.names[i] for p, i in found.items()}
    if same:
        p = next(iter(same))
        log.warning("%d person(s) have the token ids of an index name spelt otherwise and are scored as that name "
                    "(e.g. %r as %r); summary.json lists them under persons_matched_by_tokens", len(same), p, same[p])
    missing = [p for p in inputs.missing if p not in same]
    if missing and config.strict:
        raise InputError(
            f"{len(missing)} queried name(s) are not in index {config.index_dir} (e.g. {missing[0]!r}); "
            "add them to the names file and rebuild, or drop --strict to add them for this run"
        )
    lengths = None
    if missing:  # as build-index checks its names; the index's were checked then, collisions with them now
        report = check_prompt_lengths(model.tokenizer, index.templates, index.names + missing,
                                      model.info.context_length, checked_before=len(index.names))
        for line in report.warning_lines():
            log.warning("names added for this run: %s", line)
        lengths = {k: v for k, v in report.to_json().items() if k != "seconds"}
    return replace(inputs, missing=missing, same_tokens=same, added_prompt_lengths=lengths)


def image_fingerprint(model: LoadedModel, decode_version: int = DECODE_VERSION) -> str:
    """Store namespace of a model's image embeddings: the weights, the forward-pass precision and how file
    bytes became pixels (`images.DECODE_VERSION`: embeddings of photos decoded before EXIF orientation was
    applied live under version 1's namespace, so they are never reused for the upright photo)."""
    return image_fingerprint_of(model.info.fingerprint, model.precision.value, decode_version)


def image_fingerprint_of(model_fingerprint: str, precision: str, decode_version: int = DECODE_VERSION) -> str:
    """`image_fingerprint` from a model's fingerprint and forward-pass precision (`Precision` value), as a
    manifest or report records them: the store namespace without loading the model."""
    decoding = "" if decode_version == 1 else f"|decode{decode_version}"  # version 1 had no suffix
    return hashlib.sha256(f"{model_fingerprint}|image|{precision}{decoding}".encode()).hexdigest()


def _hash(inputs: QueryInputs, config: QueryConfig, progress: Progress) -> HashedImages:
    """Stage 2: per person, the photos drawn (all, or --images-per-person of them), hashed, copies dropped."""
    persons = inputs.collection.persons
    progress("hash images", 0, len(persons))
    flat: list[tuple[str, Path]] = []
    shas: list[str | None] = []
    skipped = list(inputs.collection.skipped)
    duplicates: list[DuplicatePhoto] = []
    crops = inputs.photo_inputs.crops if inputs.photo_inputs is not None else None
    for done, (name, paths) in enumerate(persons.items(), 1):
        chosen = choose_photos(name, paths, config.images_per_person, config.seed,
                               photo_key=None if crops is None else crops.photo_key(name))
        flat += [(name, p) for p in chosen.paths]
        shas += chosen.shas
        skipped += chosen.unreadable
        duplicates += chosen.duplicates
        progress("hash images", done, len(persons))
    if duplicates:
        d = duplicates[0]
        log.warning("dropped %d duplicate photo(s): the same bytes as another photo of the same person, which "
                    "votes once (e.g. %s, a copy of %s, of %r); summary.json lists them under duplicate_photos",
                    len(duplicates), d.dropped, d.kept, d.person)
    shared = _shared_photos(flat, shas)
    if shared:
        log.warning("%d photo(s) appear under more than one person (e.g. %s of %r and %s of %r), each counted for "
                    "each of them; summary.json lists them under photos_shared_between_persons", len(shared),
                    shared[0].paths[0], shared[0].persons[0], shared[0].paths[1], shared[0].persons[1])
    return HashedImages(flat, shas, skipped, duplicates, shared)


def _shared_photos(flat: list[tuple[str, Path]], shas: list[str | None]) -> list[SharedPhoto]:
    """The contents found under more than one person (each person has one copy at most: copies were dropped)."""
    holders: dict[str, list[tuple[str, Path]]] = {}
    for (name, path), sha in zip(flat, shas):
        if sha is not None:
            holders.setdefault(sha, []).append((name, path))
    return [SharedPhoto(sha, [n for n, _ in who], [str(p) for _, p in who])
            for sha, who in holders.items() if len(who) > 1]


def _skipped_by_encode(hashed: HashedImages, encoded: EncodeOutcome) -> list[Skipped]:
    """The chosen files the encode stage could not use: bytes that do not decode (every file with them), and
    reads that failed now (the file that failed; other files with its bytes say so)."""
    out = []
    for (_, path), sha in zip(hashed.flat, hashed.shas):
        if sha in encoded.undecodable:
            out.append(Skipped(str(path), encoded.undecodable[sha]))
        elif sha in encoded.unread:
            failed, reason = encoded.unread[sha]
            out.append(Skipped(str(path), reason if path == failed else
                               f"the same bytes as {failed}, which could not be read now ({reason})"))
    return out


def _encode(model: LoadedModel, store: EmbeddingStore, ns: Namespace, hashed: HashedImages, config: QueryConfig,
            progress: Progress, crops: CropPlan | None = None) -> EncodeOutcome:
    """Stage 3: every distinct image content not yet in the store (nor known not to decode) is encoded
    (with `crops`, every distinct face box of a file)."""
    unique: dict[str, Path] = {}
    for (_, path), sha in zip(hashed.flat, hashed.shas):
        if sha is not None:
            unique.setdefault(sha, path)
    cached = store.contains(ns, list(unique))
    known_bad = store.failures(ns, [sha for sha, hit in zip(unique, cached) if not hit])
    todo = [(path, sha) for (sha, path), hit in zip(unique.items(), cached) if not hit and sha not in known_bad]
    if todo:
        store.require_writable(len(todo))  # before any encoding: a read-only store fails here
        _warn_of_embeddings_before_exif(model, store, ns, [sha for _, sha in todo])
    encoded, undecodable, unread = _encode_missing(model, store, ns, todo, config, progress, crops)
    # A file whose bytes do not decode is skipped, and so is every other file with the same bytes.
    undecodable.update(known_bad)
    return EncodeOutcome(encoded, len(unique) - len(todo) - len(known_bad), len(known_bad), undecodable,
                         {sha: (unique[sha], reason) for sha, reason in unread.items()})


def _warn_of_embeddings_before_exif(model: LoadedModel, store: EmbeddingStore, ns: Namespace,
                                    shas: list[str]) -> None:
    """Say so when photos about to be encoded have embeddings from before EXIF orientation was applied (decode
    version 1): they are not reused (another namespace), which a user of the old store should know."""
    legacy = Namespace(image_fingerprint(model, decode_version=1), ns.dim, ns.dtype)
    n_legacy = int(store.contains(legacy, shas).sum())
    if n_legacy:
        log.warning("store %s holds embeddings of %d of these photo(s) made before idia-engine applied their EXIF "
                    "orientation; they are not reused: the photos are encoded again (the old entries stay unused)",
                    store.path, n_legacy)


def _encode_missing(model: LoadedModel, store: EmbeddingStore, ns: Namespace, items: list[tuple[Path, str]],
                    config: QueryConfig, progress: Progress,
                    crops: CropPlan | None = None) -> tuple[int, dict[str, str], dict[str, str]]:
    """Encode the (path, sha) items not yet stored; return (encoded count, {sha: why its bytes do not decode},
    {sha: why the file could not be read now}). Only the first kind is stored: a read that failed or found
    the file changed is tried again by the next run."""
    dataset = (ImageDataset(items, model.preprocess, keys_are_sha256=True) if crops is None
               else crops.dataset(items, model.preprocess))
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, num_workers=config.workers,
                                         collate_fn=collate_for_store, shuffle=False)
    encoded, failed, unread, done = 0, {}, {}, 0
    progress("encode images", 0, len(items))
    for pixels, shas, bad, not_read in loader:
        failed.update(bad)
        unread.update(not_read)
        emb = model.encode_images(pixels) if pixels is not None else np.zeros((0, ns.dim), np.float32)
        # One committed transaction per batch: its embeddings and its undecodable files together.
        store.put_many(ns, shas, emb, failures=bad)
        fault_point("query.encode.committed")
        encoded += len(shas)
        done += len(shas) + len(bad) + len(not_read)
        progress("encode images", done, len(items))
    if unread:
        sha, reason = next(iter(unread.items()))
        path = next(path for path, item_sha in items if item_sha == sha)
        log.warning("%d photo(s) could not be read now and are skipped for this run, not remembered in the "
                    "store (e.g. %s: %s)", len(unread), path, reason)
    return encoded, failed, unread


def _person_ids(inputs: QueryInputs, rows: list[tuple[str, Path, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(person index [M] of each image row, candidate id [P] of each person's true name); names missing from
    the index have ids after the index's names, in the order of `inputs.missing`."""
    persons, index = inputs.persons, inputs.index
    person_index = {name: i for i, name in enumerate(persons)}
    candidate_id = {name: len(index.names) + i for i, name in enumerate(inputs.missing)}
    true_ids = np.array([candidate_id[p] if p in candidate_id else inputs.index_id(p) for p in persons], np.int64)
    return np.array([person_index[n] for n, _, _ in rows], np.int64), true_ids


def _search(index: NameIndex, images: QueryEmbeddings, rows: list[tuple[str, Path, str]],
            extra_emb: np.ndarray | None, model: LoadedModel, config: QueryConfig, tmp: Path, person: np.ndarray,
            true_ids: np.ndarray, progress: Progress) -> tuple[np.ndarray, np.ndarray, dict]:
    """Stage 4: the top-k per image and template into predictions/, and how each top-1 was obtained; returns
    (top-1 ids [M, T], top-1 status [M, T], search stats). Approximate kinds settle cells (`settle.py`)."""
    n_templates = len(index.templates)
    n_extra = 0 if extra_emb is None else extra_emb.shape[1]
    k = min(config.top_k, len(index.names) + n_extra)
    pred_dir = tmp / PREDICTIONS
    pred_dir.mkdir()
    ids_mm = allocate_npy(pred_dir / "topk_ids.npy", dtype=np.int32, shape=(len(rows), n_templates, k))
    scores_mm = allocate_npy(pred_dir / "topk_scores.npy", dtype=np.float32, shape=(len(rows), n_templates, k))
    status_mm = allocate_npy(pred_dir / TOP1_STATUS, dtype=np.int8, shape=(len(rows), n_templates))
    by_cells = config.cells and config.exact_fallback and not index.kind.exact_search
    job = SearchJob(index=index, images=images, extra_emb=extra_emb, k=k,
                    use_gpu=model.device.type == "cuda", chunk=config.search_chunk,
                    search_params=config.search_params, fallback=config.exact_fallback and not by_cells)
    stats = search_all(job, ids_mm, scores_mm, status_mm, progress)
    stats["decided_by"] = "cells" if by_cells else "per prediction"
    if by_cells:
        stats["cells"] = settle_cells(job, person, true_ids, ids_mm, scores_mm, status_mm, progress)
        stats.update(status_counts(status_mm))
    top1 = np.array(ids_mm[:, :, 0], dtype=np.int64)
    status = np.array(status_mm)
    for mm in (ids_mm, scores_mm, status_mm):
        mm.flush()
    del ids_mm, scores_mm, status_mm
    return top1, status, stats


def _decide(inputs: QueryInputs, person: np.ndarray, true_ids: np.ndarray, top1: np.ndarray, status: np.ndarray,
            tau: int) -> Decision:
    """Stage 5: paper mode over every person's predicted names. Hits, scores and decisions are exact whenever
    the search was (cells settled by witnesses vote as their exact top-1s would); vote counts are exact in
    the cells whose photos all have an exact top-1 (`votes_exact`)."""
    votes = paper_mode_votes(top1, person, true_ids)
    decisions = votes.decisions(tau)
    metrics, label_info = label_metrics(inputs.persons, votes.n_images, decisions, inputs.labels)
    not_exact = ~np.isin(status, EXACT_STATUSES)  # [M, T]
    open_counts = np.zeros((len(true_ids), status.shape[1]), np.int64)
    np.add.at(open_counts, person, not_exact.astype(np.int64))
    return Decision(votes, decisions, metrics, label_info, open_counts == 0)


def _write_report(tmp: Path, config: QueryConfig, inputs: QueryInputs, model: LoadedModel, found: RowsToScore,
                  decision: Decision, search_stats: dict, summary_extra: dict | None) -> dict:
    """Stage 6 (all but run.json): the report files in the staging directory; returns summary.json's content."""
    persons, index, rows = inputs.persons, inputs.index, found.rows
    candidates = index.names + inputs.missing
    in_index = np.array([inputs.index_id(p) is not None for p in persons])
    write_persons(tmp / "persons.csv", persons, decision.votes, decision.decisions, inputs.labels, in_index)
    write_modes(tmp / "modes.csv", persons, decision.votes, candidates, decision.votes_exact)
    write_images_csv(tmp / PREDICTIONS / "images.csv", [(n, str(p), s) for n, p, s in rows])
    (tmp / PREDICTIONS / "candidates.txt").write_text("".join(c + "\n" for c in candidates), encoding="utf-8")
    write_topk_tables(tmp / PREDICTIONS, [(n, str(p)) for n, p, _ in rows], candidates, index.templates)
    images_used = decision.votes.n_images
    summary = build_summary(config, index, model, config.store_path, inputs.collection, persons, images_used, rows,
                            found.skipped, inputs.missing, decision.votes, decision.decisions, decision.metrics,
                            decision.label_info, min(config.top_k, len(candidates)),
                            duplicates=found.duplicates, shared=found.shared, same_tokens=inputs.same_tokens,
                            added_prompt_lengths=inputs.added_prompt_lengths)
    summary["search"] = search_stats
    if inputs.photo_inputs is not None:
        _add_photo_inputs(tmp, summary, inputs.photo_inputs, rows)
    summary.update(summary_extra or {})
    write_summary(tmp, summary)
    return summary


def _add_photo_inputs(tmp: Path, summary: dict, photo_inputs: PhotoInputs, rows: list[tuple[str, Path, str]]) -> None:
    """Where the photos of several roots, aliases or a faces list came from (summary.json's parameters and
    "inputs"), and with --crop which box each image row is (predictions/crops.csv)."""
    summary["parameters"].update(photo_inputs.parameters())
    summary["inputs"] = photo_inputs.summary()
    summary["files"] = {**summary["files"], **photo_inputs.files()}
    if photo_inputs.crops is not None:
        photo_inputs.crops.write_csv(tmp / CROPS_CSV, rows)
