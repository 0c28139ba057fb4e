"""build-index: encode every (template, name) prompt and write the index directory (`layout.py`).

Stages, each a function below:
1. plan     - the index kind, the prompt-length checks and the build key (a hash of everything that
              determines the result: names, templates, model fingerprint, precision, kind, batch size);
              a build of the same key that already finished is reused, not redone
2. encode   - per template, prompts in batches appended to its vectors file, committed to progress.json
              (`encode.py`): an interrupted build resumes after its last committed rows
3. index    - right after its rows, each template's index is built by the index kind (trained on a
              seeded sample, filled in chunks: memory is one template's index plus one chunk); then the
              kind's whole-index step (the template ensemble builds its means here)
4. publish  - every data file fsynced, the build directory renamed to data-<build_id>, manifest.json
              replaced (the commit point), stale generations removed (`directory.py`)

A crash at any point leaves the previous index (or none) loadable and never a half-written one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from idia_engine.indexes import IndexKind, backend_kinds, choose_index, get_backend, vectors_file
from idia_engine.indexes.hardware import cpu_bf16_native

from ..candidates.identity import NameTokens, TokenTwin
from ..candidates.names_file import NameList, read_names
from ..candidates.prompt_lengths import check_prompt_lengths
from ..candidates.templates import PAPER_TEMPLATES
from ..disk.atomic import TMP_MARK, write_bytes_atomic, write_json_atomic
from ..disk.faults import fault_point
from ..disk.locks import exclusive_lock
from ..disk.space import require_free_space
from ..disk.textfiles import check_whole_number
from ..disk.versions import library_versions, utc_now
from ..errors import ArtifactExistsError, IdiaError, InputError
from ..model.load import DeviceChoice, LoadedModel, ModelSpec, Precision, load_model
from ..model.text_encoder import TextPath
from ..progress import Progress, no_progress
from ..ray_cluster import check_ray_address
from .directory import check_index_dir_writable, finished_build, remove_stale_builds
from .encode import encode_template, read_progress, save_progress
from .layout import (
    BUILD_LOCK,
    BUILD_PREFIX,
    INDEX_ARTIFACT,
    INDEX_SCHEMA_VERSION,
    MANIFEST_NAME,
    NAMES_FILE,
    PROGRESS_FILE,
    READERS_LOCK,
    IndexManifest,
    existing_manifest,
    manifest_checksum,
    names_bytes,
)

if TYPE_CHECKING:
    from .ray_encode import RayPromptEncoders

log = logging.getLogger(__name__)


MAX_BATCH = 65536  # prompts per forward pass (a batch's tokens and activations are held at once)


@dataclass(frozen=True)
class BuildConfig:
    """Everything `build_index` needs; checked when made (before any file is read or model loaded)."""

    names_file: Path  # UTF-8, one full name per line
    index_dir: Path = Path("idia-index")  # where the index is written
    model: ModelSpec = field(default_factory=ModelSpec)  # model and weights
    templates: tuple[str, ...] = PAPER_TEMPLATES  # normalised templates ({0} placeholder)
    index_kind: str = "auto"  # auto (choose_index), flat, dense, ensemble, a registry kind or a faiss factory string
    device: DeviceChoice = DeviceChoice.AUTO  # where the text encoder (and a GPU index) runs
    precision: Precision = Precision.FP32  # forward-pass precision of the text encoder
    batch_size: int = 256  # prompts per forward pass
    overwrite: bool = False  # replace an existing index in index_dir
    memory_budget_bytes: int = 8 << 30  # what all templates' indexes may take together (for --index auto)
    ray: str | None = None  # encode on this Ray cluster's actors (host:port, ray://host:port, auto, local)
    ray_actors: int = 0  # how many (0: one per GPU of the cluster, else one per CPU); with ray="local", its CPUs

    def __post_init__(self) -> None:
        if not isinstance(self.index_kind, str):
            raise InputError(f"--index must be a string (auto, flat, dense or a faiss factory string), "
                             f"got {self.index_kind!r}")
        if self.index_kind != "auto":  # fail fast on a bad --index, before any model is loaded
            try:
                get_backend(resolve_index_kind(self.index_kind, 1, 1, 1, "cpu", 1)[0])
            except IdiaError as e:
                raise InputError(f"--index {self.index_kind!r} is neither auto, flat, dense nor a valid faiss "
                                 f"factory string such as IVF4096,SQ8 or HNSW32,Flat ({e})") from None
        check_whole_number("--batch-size", self.batch_size, 1, MAX_BATCH, "prompts per forward pass")
        if isinstance(self.memory_budget_bytes, int) and not isinstance(self.memory_budget_bytes, bool) \
                and self.memory_budget_bytes < 1:
            raise InputError(f"--memory-budget must be positive, got {self.memory_budget_bytes} bytes")
        check_whole_number("--memory-budget (bytes)", self.memory_budget_bytes, 1)
        check_whole_number("--ray-actors", self.ray_actors, 0, None, "")
        if self.ray_actors and not self.ray:
            raise InputError("--ray-actors needs --ray ADDRESS (the cluster the actors run on)")
        if self.ray:
            check_ray_address(self.ray)  # before any work: an unreachable cluster is one line, nothing written
        if not self.templates or not all(isinstance(t, str) for t in self.templates):
            raise InputError(f"templates must be a non-empty sequence of strings, got {self.templates!r}")


def resolve_index_kind(kind: str, num_names: int, num_templates: int, dim: int, device: str,
                       memory_budget_bytes: int) -> tuple[str, dict[str, Any], str]:
    """(registry kind, default search params, reason) for --index: "auto", a registered kind ("flat",
    "dense", "ensemble", ...), or any faiss factory string ("IVF4096,SQ8", "HNSW32,Flat", ...)."""
    kind = kind.strip()
    if kind == "auto":
        choice = choose_index(num_names, num_templates, dim, memory_budget_bytes, device,
                              cpu_bf16=cpu_bf16_native())
        if choice.factory == "Flat" and not choice.gpu_float16 and not choice.registry_kind:
            return "flat", {}, choice.reason
        return choice.kind, dict(choice.search_params), choice.reason
    if kind in backend_kinds() or ":" in kind:
        return kind, {}, "asked for"
    return f"faiss:{kind}", {}, "asked for (faiss factory string)"


def build_index(config: BuildConfig, progress: Progress = no_progress,
                model: LoadedModel | None = None) -> IndexManifest:
    """Encode every (template, name) prompt and write the index directory; return its manifest.

    Inputs are validated before anything is written or the model is loaded. `model` may be passed to reuse
    a loaded model. Rerunning an interrupted build with the same inputs resumes it (committed batches are
    not encoded again). One build at a time per index directory: a second one raises LockBusyError.
    """
    index_dir = Path(config.index_dir)
    name_list = read_names(config.names_file)
    names_sha = hashlib.sha256(names_bytes(name_list.names)).hexdigest()
    _check_writable_before_tokens(index_dir, config.overwrite, names_sha, list(config.templates))
    created = not index_dir.exists()
    index_dir.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(index_dir / BUILD_LOCK, f"index dir {index_dir} (build-index)"):
            # Again, under the lock: another build may just have finished.
            _check_writable_before_tokens(index_dir, config.overwrite, names_sha, list(config.templates))
            if model is None:  # with --ray, this machine only tokenizes and indexes: the actors encode
                model = load_model(config.model, "cpu" if config.ray else config.device, config.precision)
            names, twins = _drop_token_twins(config.names_file, model, name_list.names)
            if twins:  # the name table is now known: check against it what the first check had to leave open
                names_sha = hashlib.sha256(names_bytes(names)).hexdigest()
                check_index_dir_writable(index_dir, config.overwrite, names_sha, list(config.templates))
            with _prompt_encoders(config, model, names) as actors:
                plan = _plan(config, name_list, names, twins, names_sha, model, actors)
                finished = finished_build(index_dir, plan.key, config.overwrite)
                if finished:
                    return finished
                # what the kind writes in all (raw vectors, index files, the name table), before any of it
                needed = plan.kind.build_disk_bytes(len(plan.names), len(plan.templates), model.info.embed_dim)
                require_free_space(index_dir, needed + sum(len(n.encode("utf-8")) + 1 for n in plan.names),
                                   "the index")
                return _build(config, plan, model, progress, actors)
    except BaseException:
        if created:  # leave no empty index directory behind, but keep any resumable work
            leftovers = [q for q in index_dir.iterdir() if q.name != BUILD_LOCK]
            if not leftovers:
                shutil.rmtree(index_dir, ignore_errors=True)
        raise


@dataclass(frozen=True)
class BuildPlan:
    """What one build does, decided once the model is loaded."""

    names: list[str]  # the name table: row i of every template index
    names_sha: str  # SHA-256 of names.txt
    duplicates_dropped: int  # duplicate names skipped while reading the names file
    token_duplicates: dict[str, Any]  # names dropped for an earlier name's token ids (manifest token_duplicates)
    templates: list[str]
    kind: type[IndexKind]  # the index kind's class (registry)
    search_params: dict[str, Any]  # its default per-call search parameters
    reason: str  # why this kind (auto's choice, or "asked for")
    key: str  # hash of everything that determines the result: names the resumable build directory
    prompt_lengths: dict[str, Any]  # truncated and colliding prompts (manifest encode.prompt_lengths)


# How many token duplicates the manifest lists by name (all are counted): a bound on the manifest's size.
MAX_TOKEN_DUPLICATES_LISTED = 1000


def _check_writable_before_tokens(index_dir: Path, overwrite: bool, names_sha: str, templates: list[str]) -> None:
    """`check_index_dir_writable` before the model's tokenizer has dropped token duplicates: an index whose
    manifest says it dropped some holds a smaller name table than the file's, so whether it is of these same
    names is decided after `_drop_token_twins` (a needless refusal here would ask for --overwrite)."""
    try:
        check_index_dir_writable(index_dir, overwrite, names_sha, templates)
    except ArtifactExistsError:
        current = existing_manifest(index_dir)
        if current is None or current.get("templates") != templates \
                or not current.get("token_duplicates", {}).get("dropped"):
            raise


def _drop_token_twins(names_file: Path, model: LoadedModel, names: list[str]) -> tuple[list[str], list[TokenTwin]]:
    """The names without those whose token ids in the model's tokenizer equal an earlier name's (`Anna  Smith`,
    `ANNA SMITH`, `Anna&amp;...` beside the same text written plainly): to the model they are one name, which
    the earlier spelling would win every tie of. The first spelling is kept, like a duplicate's."""
    twins = NameTokens(model.tokenizer).twins(names)
    if not twins:
        return names, []
    log.warning("%s: dropped %d name(s) that the model's tokenizer reads as the same tokens as an earlier name, "
                "first kept (e.g. %r = %r); the manifest lists them under token_duplicates", names_file, len(twins),
                twins[0].name, twins[0].same_tokens_as)
    dropped = {t.name for t in twins}
    return [n for n in names if n not in dropped], twins


def _prompt_encoders(config: BuildConfig, model: LoadedModel, names: list[str]):
    """The Ray actors that encode this build's prompts (`ray_encode.py`), or nothing without --ray."""
    if not config.ray:
        return nullcontext(None)
    from .ray_encode import RayPromptEncoders

    return RayPromptEncoders(config.ray, config.ray_actors, config.model, config.precision, config.device, names,
                             config.batch_size, after_start=lambda actors: actors.check_weights(model))


def _plan(config: BuildConfig, name_list: NameList, names: list[str], twins: list[TokenTwin], names_sha: str,
          model: LoadedModel, actors: RayPromptEncoders | None = None) -> BuildPlan:
    templates = list(config.templates)
    encoded_on = actors.setup.device if actors is not None else model.device.type
    device = "cuda" if encoded_on == "cuda" else "cpu"
    kind, search_params, reason = resolve_index_kind(config.index_kind, len(names), len(templates),
                                                     model.info.embed_dim, device, config.memory_budget_bytes)
    kind_cls = get_backend(kind)
    log.info("index kind %s: %s", kind, reason)
    token_duplicates = {"dropped": len(twins), "names": [
        {"name": t.name, "same_tokens_as": t.same_tokens_as} for t in twins[:MAX_TOKEN_DUPLICATES_LISTED]]}
    return BuildPlan(names=names, names_sha=names_sha, duplicates_dropped=name_list.duplicates_dropped,
                     token_duplicates=token_duplicates, templates=templates, kind=kind_cls,
                     search_params=search_params, reason=reason,
                     key=_build_key(names_sha, templates, model, kind, config.batch_size, actors),
                     prompt_lengths=_check_prompts(config.names_file, model, templates, names))


def _check_prompts(names_file: Path, model: LoadedModel, templates: list[str], names: list[str]) -> dict[str, Any]:
    """Warn about prompts the tokenizer cuts or makes identical; the counts for the manifest.

    Prompts longer than the text tower's context are cut by the tokenizer without a word: say so, and
    which names then get identical prompts (and so identical embeddings)."""
    lengths = check_prompt_lengths(model.tokenizer, templates, names, model.info.context_length)
    for line in lengths.warning_lines():
        log.warning("%s: %s", names_file, line)
    return {k: v for k, v in lengths.to_json().items() if k != "seconds"}


def _build_key(names_sha: str, templates: list[str], model: LoadedModel, kind: str, batch_size: int,
               actors: RayPromptEncoders | None = None) -> str:
    """What determines the vectors: the same key (on Ray actors or here) resumes the same build directory."""
    precision, text_path = _encoding(model, actors)
    h = hashlib.sha256()
    for part in (names_sha, "\x1f".join(templates), model.info.fingerprint, precision.value, kind,
                 str(batch_size), str(text_path)):
        h.update(part.encode("utf-8") + b"\x00")
    return h.hexdigest()[:24]


def _encoding(model: LoadedModel, actors: RayPromptEncoders | None) -> tuple[Precision, TextPath]:
    """(precision, text forward pass) the prompts are encoded with: here, or on the Ray actors."""
    if actors is None:
        return model.precision, model.text_path
    return Precision(actors.setup.precision), TextPath(actors.setup.text_path)


def _build(config: BuildConfig, plan: BuildPlan, model: LoadedModel, progress: Progress,
           actors: RayPromptEncoders | None = None) -> IndexManifest:
    index_dir = Path(config.index_dir)
    build_dir = index_dir / f"{BUILD_PREFIX}{plan.key}"
    build_dir.mkdir(exist_ok=True)
    for leftover in build_dir.rglob(f"*{TMP_MARK}*"):  # half-written files of a killed run (atomic writes)
        if leftover.is_file():
            leftover.unlink()
    state = read_progress(build_dir, plan.key, len(plan.templates))
    reused = sum(state["rows"])  # committed rows of an earlier, interrupted run of this same build
    if reused:
        log.info("resuming the unfinished build in %s (%d of %d prompts on disk)", build_dir, reused,
                 len(plan.templates) * len(plan.names))
    if not (build_dir / NAMES_FILE).is_file():
        write_bytes_atomic(build_dir / NAMES_FILE, names_bytes(plan.names))
    index_seconds = _encode_and_index(config, plan, model, build_dir, state, progress, actors)
    return _publish(config, plan, model, build_dir, state, index_seconds, reused, actors)


def _encode_and_index(config: BuildConfig, plan: BuildPlan, model: LoadedModel, build_dir: Path,
                      state: dict[str, Any], progress: Progress, actors: RayPromptEncoders | None = None) -> float:
    """Stages 2 and 3: encode each template's prompts and index them; return the seconds spent indexing.
    With `actors`, every template's batches are queued on them first, and they encode ahead while this
    process indexes."""
    names, templates, kind = plan.names, plan.templates, plan.kind
    use_gpu = model.device.type == "cuda"
    if actors is not None:
        actors.plan([(t, template, state["rows"][t]) for t, template in enumerate(templates)
                     if not state["indexed"][t]])
    total = len(templates) * len(names)
    done = sum(state["rows"])
    progress("encode prompts", done, total)

    def on_rows(n: int) -> None:
        nonlocal done
        done += n
        progress("encode prompts", done, total)

    index_seconds = 0.0
    for t, template in enumerate(templates):
        if state["indexed"][t]:
            _drop_vectors_file(kind, build_dir, t)  # a run killed right after recording it indexed
            continue
        batches = actors.batches(t, state["rows"][t]) if actors is not None else None
        encode_template(model, template, names, t, build_dir, state, config.batch_size, on_rows, batches)
        t1 = time.perf_counter()
        kind.build_template(t, np.load(build_dir / vectors_file(t), mmap_mode="r"), build_dir, use_gpu=use_gpu,
                            search_params=plan.search_params)
        kind.store_raw_rows(t, build_dir)
        # recorded before the vectors file goes: a resumed build never meets an indexed template without it
        state["indexed"][t] = True
        save_progress(build_dir, state)
        fault_point("build.template.indexed")
        _drop_vectors_file(kind, build_dir, t)
        index_seconds += time.perf_counter() - t1
        progress("index templates", t + 1, len(templates))
    if not state.get("finished", False):
        t1 = time.perf_counter()
        rows = [] if kind.exact_search else [kind.raw_rows(build_dir, t) for t in range(len(templates))]
        kind.finish_build(build_dir, rows, progress=progress)
        del rows
        state["finished"] = True
        save_progress(build_dir, state)
        index_seconds += time.perf_counter() - t1
    return index_seconds


def _drop_vectors_file(kind: type[IndexKind], build_dir: Path, t: int) -> None:
    """Delete template t's raw float32 vectors file where the kind does not keep it (exact kinds answer from
    their own rows; bf16 kinds keep the rows as low halves beside their bf16 copy)."""
    if not kind.keeps_vectors_file():
        (build_dir / vectors_file(t)).unlink(missing_ok=True)


def _publish(config: BuildConfig, plan: BuildPlan, model: LoadedModel, build_dir: Path, state: dict[str, Any],
             index_seconds: float, reused: int, actors: RayPromptEncoders | None = None) -> IndexManifest:
    """Stage 4: data on disk, the build directory renamed to data-<id>, the manifest switched."""
    index_dir = Path(config.index_dir)
    (build_dir / PROGRESS_FILE).unlink()
    (build_dir / READERS_LOCK).touch()  # queries pin this generation with it (not a data file)
    data_files = sorted(p for p in build_dir.rglob("*")
                        if p.is_file() and p.name != READERS_LOCK and TMP_MARK not in p.name)
    files = {p.relative_to(build_dir).as_posix(): p.stat().st_size for p in data_files}
    for p in data_files:  # data on disk before the manifest points at it
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    build_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    data_name = f"data-{build_id}"
    obj = asdict(_manifest(config, plan, model, build_id, data_name, files, state["encode_seconds"],
                           index_seconds, reused, actors))
    obj["manifest_sha256"] = manifest_checksum(obj)
    manifest = IndexManifest(**obj)
    # A copy travels with the data (not one of its files): a crash right after publishing loses nothing.
    write_json_atomic(build_dir / MANIFEST_NAME, obj)
    os.replace(build_dir, index_dir / data_name)
    fault_point("build.data.published")
    write_json_atomic(index_dir / MANIFEST_NAME, obj)
    fault_point("build.manifest.written")
    remove_stale_builds(index_dir, keep=data_name)
    log.info("built index %s: %d names x %d templates in %.1fs", index_dir, len(plan.names), len(plan.templates),
             state["encode_seconds"])
    return manifest


def _manifest(config: BuildConfig, plan: BuildPlan, model: LoadedModel, build_id: str, data_name: str,
              files: dict[str, int], seconds: float, index_seconds: float, reused: int,
              actors: RayPromptEncoders | None = None) -> IndexManifest:
    total = len(plan.templates) * len(plan.names)
    precision, text_path = _encoding(model, actors)
    where = {"device": str(model.device)} if actors is None else \
        {"device": f"ray:{actors.setup.device}", "ray": actors.describe()}
    return IndexManifest(
        schema_version=INDEX_SCHEMA_VERSION,
        artifact=INDEX_ARTIFACT,
        build_id=build_id,
        data_dir=data_name,
        created_at=utc_now(),
        model=model.info.to_json(),
        embedding_dim=model.info.embed_dim,
        metric="inner_product",
        normalized=True,
        templates=plan.templates,
        index_kind=plan.kind.kind,
        search_params=plan.search_params,
        num_names=len(plan.names),
        num_templates=len(plan.templates),
        names_sha256=plan.names_sha,
        source_names_file=str(Path(config.names_file).resolve()),
        duplicates_dropped=plan.duplicates_dropped,
        token_duplicates=plan.token_duplicates,
        files=files,
        encode={**where, "precision": precision.value, "batch_size": config.batch_size,
                "text_path": text_path.value,
                "prompts": total, "seconds": round(seconds, 3),
                "prompts_per_second": round(total / seconds, 1) if seconds > 0 else None,
                "index_seconds": round(index_seconds, 3), "index_choice": plan.reason, "resumed": reused > 0,
                "prompts_reused": reused, "build_key": plan.key, "prompt_lengths": plan.prompt_lengths},
        library_versions=library_versions(),
    )
