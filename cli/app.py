"""The `idia-engine` command line: a thin adapter over the library.

Each command parses options, builds a config, calls one library function and renders its result.
Library errors (IdiaError) become one line on stderr and the error's exit code (2 = bad input or usage,
1 = runtime failure); nothing else is printed for them.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from idia_engine.engine.errors import IdiaError
from idia_engine.engine.model.load import DEFAULT_MODEL, DEFAULT_PRETRAINED, DeviceChoice, ModelSpec, Precision
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

app = typer.Typer(
    name="idia-engine",
    help="Identity Inference Attack (IDIA) on CLIP models: does this model know this person?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# No markup on either console: what they print holds the user's paths, names and notes ("out[/x]", "[bold]"),
# which rich would otherwise read as tags (and crash on, after the work is done). Styles are given as Text.
err = Console(stderr=True, markup=False)
out = Console(markup=False)


class _OneLineHandler(logging.Handler):
    """Log records as one unwrapped line each on stderr ("warning: ..."), so that warnings stay greppable.

    Without -v, records of the root logger below ERROR are dropped: libraries (open_clip) log there about
    things the engine already reports. The engine's own warnings (duplicates, unknown labels) always show.
    """

    def __init__(self, verbose: bool):
        super().__init__(logging.INFO if verbose else logging.WARNING)
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or record.name != "root" or record.levelno >= logging.ERROR

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = " ".join(self.format(record).splitlines())
            prefix = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
            err.print(Text(prefix + message, style="yellow" if record.levelno == logging.WARNING else ""),
                      soft_wrap=True, highlight=False)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", force=True,
                        handlers=[_OneLineHandler(verbose)])
    # huggingface_hub and open_clip log at WARNING about things the engine already reports.
    for noisy in ("huggingface_hub", "open_clip"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not verbose else logging.INFO)


@contextmanager
def _progress_bars(enabled: bool) -> Iterator:
    """A library progress callback drawing one rich bar per stage."""
    if not enabled:
        yield lambda stage, done, total: None
        return
    bars = Progress(TextColumn("{task.description:<22}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err, transient=False)
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    with bars:
        yield update


@contextmanager
def _errors_to_exit(location: Path | None = None) -> Iterator[None]:
    """Library errors as one line and an exit code; `location` (the command's output) is where a full disk is
    reported, if an error turns out to be one."""
    from idia_engine.engine.disk.space import as_disk_full

    try:
        try:
            yield
        except (IdiaError, KeyboardInterrupt):
            raise
        except Exception as e:  # a writer's own failure (faiss, LMDB, numpy): a full disk is one line too
            full = as_disk_full(e, location)
            if full is None:
                raise
            raise full from None
    except IdiaError as e:
        # One line: the message is text, never rich markup (a path like faces/[2024]/ must survive).
        err.print(Text.assemble(("error:", "bold red"), " ", " ".join(str(e).splitlines())),
                  highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err.print(Text.assemble(("interrupted", "bold red"), ": committed work is kept; rerun the same command to resume"))
        raise typer.Exit(130) from None


VerboseOpt = typer.Option(False, "--verbose", "-v", help="Log what happens (INFO level).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")
DeviceOpt = typer.Option(DeviceChoice.AUTO, "--device", help="auto = CUDA when torch sees a GPU, else CPU.")
PrecisionOpt = typer.Option(Precision.FP32, "--precision", help="Forward-pass precision (fp16/bf16 run under autocast; "
                            "auto: fp16 on CUDA, bf16 on a CPU with native bf16, else fp32).")


@app.command("build-index")
def build_index_cmd(
    names_file: Path = typer.Argument(..., help="UTF-8 text, one full name per line ('#' comments, blank lines ignored)."),
    index_dir: Path = typer.Option(Path("idia-index"), "--index-dir", help="Where to write the index."),
    model: str = typer.Option(DEFAULT_MODEL, "--model",
                              help="open_clip model name, hf-hub:org/repo, or path to a model-config JSON."),
    pretrained: Optional[str] = typer.Option(
        None, "--pretrained",
        help=f"open_clip tag, hf-hub:org/repo, local checkpoint path, or 'none' (random weights). "
             f"Default: {DEFAULT_PRETRAINED} for {DEFAULT_MODEL}."),
    templates_file: Optional[Path] = typer.Option(
        None, "--templates", help="File of prompt templates, one per line, each with one {0} or {}. Default: the paper's 21."),
    index_kind: str = typer.Option(
        "auto", "--index",
        help="auto (chosen from names x templates x dim, --memory-budget and the device), flat (exact FAISS), "
             "dense (torch, the paper's baseline), bf16 (a bfloat16 full scan with a proved error bound, for CPUs "
             "with AMX / AVX-512 BF16), ensemble-bf16 (cells by witnesses, open photos by certified bf16 scans; auto's choice on such CPUs from 50,000 names), or any faiss factory string (IVF4096,SQ8, HNSW32,Flat, SQ8, ...): "
             "approximate indexes are re-ranked exactly and certified at query time."),
    memory_budget: float = typer.Option(8.0, "--memory-budget", help="GiB all templates' indexes may take (for --index auto)."),
    device: DeviceChoice = DeviceOpt,
    precision: Precision = PrecisionOpt,
    batch_size: int = typer.Option(256, "--batch-size", help="Prompts per forward pass."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an index already in --index-dir."),
    ray: Optional[str] = typer.Option(
        None, "--ray",
        help="Encode on Ray actors: host:port, ray://host:port, auto, or local (a Ray started here). This machine "
             "tokenizes, writes and indexes; model files must be at the same path on every node."),
    ray_actors: int = typer.Option(
        0, "--ray-actors", help="Ray actors (0 = one per GPU of the cluster, else one per CPU); with --ray local, its CPUs."),
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Encode every (template, name) prompt once and store the embeddings in a FAISS index (resumable: rerun after an interrupt)."""
    from idia_engine.engine.candidates.templates import PAPER_TEMPLATES, load_templates
    from idia_engine.engine.index.build import BuildConfig, build_index

    _setup_logging(verbose)
    with _errors_to_exit(index_dir):
        templates = load_templates(templates_file) if templates_file is not None else PAPER_TEMPLATES
        config = BuildConfig(names_file=names_file, index_dir=index_dir, model=ModelSpec(model, pretrained),
                             templates=templates, index_kind=index_kind, device=device, precision=precision,
                             batch_size=batch_size, overwrite=overwrite,
                             memory_budget_bytes=_budget_bytes(memory_budget), ray=ray, ray_actors=ray_actors)
        with _progress_bars(not quiet) as progress:
            manifest = build_index(config, progress)
    enc = manifest.encode
    out.print(Text.assemble("index written to ", (str(index_dir), "bold"),
                            f": {manifest.num_names} names x {manifest.num_templates} templates, "
                            f"dim {manifest.embedding_dim}, {manifest.index_kind} index; {enc['prompts']} prompts in "
                            f"{enc['seconds']} s on {enc['device']} ({enc['precision']})"), highlight=False)
    if manifest.duplicates_dropped:
        out.print(f"{manifest.duplicates_dropped} duplicate name(s) dropped (first occurrence kept)")


def _command_line(ctx: typer.Context) -> str:
    """The running command as a shell-quoted line: its name and every option given on the command line (not
    defaults), in declaration order, rebuilt from the parse so it is the same however the app was invoked."""
    parts = ["idia-engine", ctx.info_name or ""]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if source is None or source.name != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        for v in value if isinstance(value, (list, tuple)) else [value]:
            v = v.value if hasattr(v, "value") else v
            if param.param_type_name != "option":
                parts.append(str(v))
            elif getattr(param, "is_flag", False):
                parts.append(param.opts[0] if v else (param.secondary_opts or param.opts)[0])
            else:
                parts += [param.opts[0], str(v)]
    return shlex.join(parts)


def _budget_bytes(gib: float) -> int:
    from idia_engine.engine.errors import InputError

    if not (gib > 0 and math.isfinite(gib)):
        raise InputError(f"--memory-budget must be a positive, finite number of GiB, got {gib}")
    return int(gib * 2**30)


def _search_params(items: list[str] | None) -> dict | None:
    """--search-param key=value (repeatable) -> {key: int/float}."""
    from idia_engine.engine.errors import InputError

    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key:
                raise ValueError
            number = float(value) if "." in value else int(value)
            if not math.isfinite(number):  # 1.0e999 parses as inf
                raise ValueError
            params[key.strip()] = number
        except ValueError:
            raise InputError(f"--search-param must look like nprobe=64 or efSearch=128, got {item!r}") from None
    return params or None


@app.command("query")
def query_cmd(
    ctx: typer.Context,
    faces_dirs: Optional[list[Path]] = typer.Argument(
        None, metavar="FACES_DIR", help="faces/<Person Name>/<images>; '_' in a folder name reads as a space. Several folders: their "
                   "persons together, one person in several folders merged (photos in folder order)."),
    index_dir: Path = typer.Option(Path("idia-index"), "--index-dir", help="An index written by build-index."),
    out_dir: Path = typer.Option(Path("idia-report"), "--out", help="Report directory (an earlier report there is replaced)."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="CSV with columns path,name instead of a faces folder."),
    aliases: Optional[Path] = typer.Option(
        None, "--aliases", help="CSV alias,name: a person folder, faces-list or --labels name equal to an alias (case "
                                "ignored) is read as that name; persons mapped to one name are merged. An alias may "
                                "not stand for another alias."),
    faces_list: Optional[Path] = typer.Option(
        None, "--faces-list", help="FaceScrub-style tab-separated list (name image_id face_id url bbox sha256, optionally path): "
                                   "the photos are its faces, found under the faces folders as "
                                   "<Name>/<Name>_<face_id>.<ext> or images/<Name>/<Name>_<image_id>.<ext> (or its "
                                   "path column); a file whose SHA-256 differs from the list's is skipped."),
    crop: bool = typer.Option(
        False, "--crop", help="With --faces-list: each photo is its face box (x1,y1,x2,y2, clipped to the photo) "
                              "instead of the whole file (paper mode); crops are stored apart from whole files."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="CSV name,member (1/0, true/false, yes/no), or "
                                          "name,membership (member/non_member), or a report's persons.csv (its label, "
                                          "else decision column): adds metrics."),
    store: Optional[Path] = typer.Option(None, "--store", help="LMDB image-embedding store. Default: <index-dir>/image-store."),
    top_k: int = typer.Option(10, "--top-k", help="Candidates kept per image and template."),
    tau: int = typer.Option(1, "--tau", help="Member iff score (templates won by the true name) >= tau."),
    images_per_person: Optional[int] = typer.Option(None, "--images-per-person", help="Use N random images per person (default: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --images-per-person draw."),
    strict: bool = typer.Option(False, "--strict", help="Error if a queried name is missing from the index (default: add it for this run)."),
    device: DeviceChoice = DeviceOpt,
    precision: Precision = PrecisionOpt,
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass and per store commit."),
    workers: int = typer.Option(0, "--workers", help="Image-decoding worker processes (0 = main process)."),
    store_dtype: str = typer.Option("float32", "--store-dtype", help="Stored embedding dtype: float32 or float16."),
    search_param: Optional[list[str]] = typer.Option(
        None, "--search-param", help="Per-call index parameter key=value, repeatable (nprobe=64, efSearch=128)."),
    no_fallback: bool = typer.Option(
        False, "--no-fallback",
        help="Approximate indexes: keep re-ranked answers that cannot be certified (counted in summary.json; "
             "faster, decisions may differ from exact) instead of answering them by exact brute force."),
    no_cells: bool = typer.Option(
        False, "--no-cells",
        help="Approximate indexes: brute-force every prediction that cannot be certified, instead of settling "
             "each (person, template) cell by witnesses and brute-forcing only what open cells need (same "
             "decisions; every top-1 exact)."),
    embeddings: Optional[Path] = typer.Option(
        None, "--embeddings",
        help="Instead of photos: their image embeddings, computed elsewhere, in clip-retrieval's layout "
             "(img_emb/img_emb_K.npy beside metadata/metadata_K.parquet; or an export's folder). Needs "
             "--embeddings-model. idia-engine cannot verify embeddings it did not compute: it takes your word "
             "for their model and their persons (summary.json says so). Rows not unit-norm are scaled to it."),
    embeddings_model: Optional[str] = typer.Option(
        None, "--embeddings-model",
        help="The model that computed --embeddings: the index's --model as its manifest records it, or its "
             "fingerprint (12+ hex digits; it pins the weights too). Anything else is refused, and so is another "
             "dimension."),
    embeddings_person_column: Optional[str] = typer.Option(
        None, "--embeddings-person-column",
        help="Metadata column holding each row's person. Default: 'name' if there is one, else the parent "
             "folder of 'image_path' ('_' read as a space). Rows without a person are left out."),
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Embed each person's photos (or read their embeddings: --embeddings), search the name index per template,
    and decide membership (paper mode)."""
    from idia_engine.engine.interop.embeddings import EmbeddingsInput
    from idia_engine.engine.query.run import QueryConfig, run_query

    _setup_logging(verbose)
    with _errors_to_exit(out_dir):
        source = None if embeddings is None else EmbeddingsInput(embeddings, embeddings_model, embeddings_person_column)
        if source is None and (embeddings_model is not None or embeddings_person_column is not None):
            from idia_engine.engine.errors import InputError

            raise InputError("--embeddings-model and --embeddings-person-column go with --embeddings DIR")
        faces_dirs = list(faces_dirs or [])
        config = QueryConfig(index_dir=index_dir, faces_dir=faces_dirs[0] if faces_dirs else None,
                             extra_faces_dirs=tuple(faces_dirs[1:]), aliases_file=aliases, faces_list=faces_list,
                             crop=crop, image_manifest=manifest, out_dir=out_dir,
                             store_dir=store, labels_file=labels, top_k=top_k, tau=tau,
                             images_per_person=images_per_person, seed=seed, strict=strict, device=device,
                             precision=precision, batch_size=batch_size, workers=workers, store_dtype=store_dtype,
                             search_params=_search_params(search_param), exact_fallback=not no_fallback,
                             cells=not no_cells, command_line=_command_line(ctx), embeddings=source)
        with _progress_bars(not quiet) as progress:
            result = run_query(config, progress)
    _print_query_summary(result.summary, result.run, out_dir)


def _check_outputs_beside_reports(out_dir: Path, reports: list[Path]) -> None:
    """Refuse an evaluate/compare output that is a report or holds one, or lies in (or holds) the faces
    folder a report was made from: the next query would read it as a person, or its swap delete the photos.
    A report that cannot be read is left to the library, which says why in its own words."""
    from idia_engine.engine.disk.atomic import check_output_placement
    from idia_engine.engine.disk.textfiles import read_artifact_json
    from idia_engine.engine.errors import IdiaError
    from idia_engine.engine.query.report import REPORT_ARTIFACT, REPORT_SCHEMA_VERSION, SUMMARY

    faces = []
    for report in reports:
        try:
            summary = read_artifact_json(Path(report) / SUMMARY, REPORT_ARTIFACT, REPORT_SCHEMA_VERSION, "")
        except IdiaError:
            continue
        parameters = summary.get("parameters") or {}
        # A report of several faces folders (or of a faces list) names them in faces_roots.
        for source in [parameters.get("source"), *(parameters.get("faces_roots") or [])]:
            if isinstance(source, str) and source and Path(source).is_dir():
                faces.append((f"faces folder of report {report}", Path(source)))
    check_output_placement(out_dir, "--out", faces, reports=reports)


def _fmt(x) -> str:
    return "n/a" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def _print_query_summary(summary: dict, run: dict, out_dir: Path) -> None:
    c = summary["counts"]
    where = (f"{run['images_encoded']} encoded, {run['images_from_cache']} from cache, {c['images_skipped']} skipped"
             if "embeddings" not in summary else "read from --embeddings, not verified")
    out.print(f"{c['persons']} persons, {c['images_used']} images used ({where}), "
              f"{c['candidates']} candidate names; tau = {summary['parameters']['tau']}", highlight=False)
    out.print(f"decided member: {c['decided_member']}   non-member: {c['decided_non_member']}", highlight=False)
    if c["candidates_added_for_this_run"]:
        out.print(f"{c['candidates_added_for_this_run']} queried name(s) were not in the index and were added for this run")
    if summary["persons_without_images"]:
        out.print(f"{len(summary['persons_without_images'])} person(s) had no usable image (listed in summary.json)")
    m = summary.get("metrics")
    if m:
        table = Table(title=f"against labels ({m['persons']} labelled persons)")
        for col in ("TP", "FP", "TN", "FN", "TPR", "FPR", "accuracy", "precision"):
            table.add_column(col, justify="right")
        table.add_row(*[_fmt(m[k]) for k in ("TP", "FP", "TN", "FN", "TPR", "FPR", "accuracy", "precision")])
        out.print(table)
    out.print(Text.assemble("report: ", (str(out_dir), "bold"), " (persons.csv, modes.csv, predictions/, summary.json)"),
              highlight=False)


@app.command("export")
def export_cmd(
    index_dir: Path = typer.Argument(..., help="An index written by build-index."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="The export folder (an earlier export there is replaced)."),
    store: Optional[Path] = typer.Option(None, "--store", help="Image-embedding store whose photos to export. Default: "
                                         "the --report's, else <index-dir>/image-store when there is one."),
    report: Optional[Path] = typer.Option(None, "--report", help="A query report: export its photos, in its row order, "
                                          "with their paths and persons (the store knows only their sha256)."),
    rows_per_file: int = typer.Option(1_000_000, "--rows-per-file", help="Rows per .npy/.parquet shard."),
    dtype: str = typer.Option("float32", "--dtype", help="Shard dtype: float32 (the rows exactly) or float16."),
    precision: Precision = typer.Option(
        Precision.FP32, "--precision",
        help="Without --report: the image forward-pass precision whose embeddings to export (the store keeps each "
             "apart)."),
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Write an index's prompt embeddings (names/text_emb, names/metadata) and its store's photo embeddings
    (images/img_emb, images/metadata) in clip-retrieval's layout, with the model in every metadata file and in
    idia_export.json: for embedding-reader, autofaiss, clip-retrieval."""
    from idia_engine.engine.interop.export import ExportConfig, export_embeddings

    _setup_logging(verbose)
    with _errors_to_exit(out_dir):
        config = ExportConfig(index_dir=index_dir, out_dir=out_dir, store_dir=store, report_dir=report,
                              rows_per_file=rows_per_file, dtype=dtype, precision=precision)
        with _progress_bars(not quiet) as progress:
            result = export_embeddings(config, progress)
    side = result.sidecar
    out.print(f"names: {side['names']['rows']} prompt embeddings in {side['names']['shards']} shard(s)", highlight=False)
    if side["images"] is not None:
        out.print(f"images: {side['images']['rows']} photo embeddings in {side['images']['shards']} shard(s)",
                  highlight=False)
    else:
        out.print("images: none (no image store of this index's model)", highlight=False)
    out.print(Text.assemble("export: ", (str(out_dir), "bold"), f" ({side['names']['model']['dtype']}; model "
                            f"fingerprint {side['names']['model']['fingerprint'][:12]} in idia_export.json)"),
              highlight=False)


@app.command("demo")
def demo_cmd(
    workdir: Path = typer.Option(Path("idia-demo"), "--workdir", help="Where the demo writes its world, model, "
                                 "index, report and evaluation (an earlier demo there is replaced)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the world, the training and the evaluation draws."),
    small: bool = typer.Option(False, "--small", help="A smaller world (60 people, 12 photos each): the tests' size."),
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Offline: make a synthetic world, train a small CLIP that knows its members, and run the attack on it."""
    from idia_engine.engine.demo.run import SMALL_DEMO, DemoConfig, run_demo
    from idia_engine.engine.demo.world import HardKind

    _setup_logging(verbose)
    with _errors_to_exit(workdir):
        with _progress_bars(not quiet) as progress:
            result = run_demo(DemoConfig(workdir=workdir, seed=seed, **(SMALL_DEMO if small else {})), progress)
    world = result.world
    members = world.members
    out.print(Text.assemble(("world", "bold"), f": {len(world.identities)} people ({len(members)} members seen in training "
              f"{', '.join(str(o) for o in world.config.occurrence_levels)} times; the others never), "
              f"{len(world.hard_non_members(HardKind.LOOKALIKE))} non-members look like a member and "
              f"{len(world.hard_non_members(HardKind.NAMESAKE))} share a name part with one; "
              f"{world.config.heldout_photos} held-out photos each; {result.index.num_names} candidate names; "
              f"a CLIP trained from scratch on {result.model.pairs} captioned images "
              f"in {result.seconds['train']:.0f} s"), highlight=False)
    _print_query_summary(result.query.summary, result.query.run, result.query.out_dir)
    _print_occurrence_table(result.evaluation.metrics)
    print_evaluation(result.evaluation.metrics, result.evaluation.out_dir)
    out.print("seconds: " + ", ".join(f"{stage} {sec:.1f}" for stage, sec in result.seconds.items()), highlight=False)
    out.print(Text.assemble("open ", (str(result.evaluation.out_dir / "report.html"), "bold"), " for the plots"),
              highlight=False)


def _print_occurrence_table(metrics: dict) -> None:
    """Members detected (TPR) by how often they were seen in training, at each n of the sweep (a few columns)."""
    occ = metrics.get("occurrences")
    if not occ:
        return
    by_n = occ["by_n"]
    shown = [row for row in by_n if row["n"] in {1, 5, 10, 20, 30} or row is by_n[-1]]
    table = Table(title="members detected (TPR, mean over draws) by training occurrences and n images")
    table.add_column("occurrences")
    for row in shown:
        table.add_column(f"n={row['n']}", justify="right")
    for b, bin_ in enumerate(occ["bins"]):
        table.add_row(f"{bin_['label']} ({bin_['members']} members)", *[_mean_std(row["TPR"][b]) for row in shown])
    out.print(table)


@app.command("evaluate")
def evaluate_cmd(
    report_dir: Path = typer.Argument(..., help="A report directory written by query."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="CSV name,member[,occurrences] (or membership, or a "
                                          "report's persons.csv; see query --labels). Default: the labels file the "
                                          "query used."),
    n_values: Optional[str] = typer.Option(None, "--n", help="Images per person to sweep, comma-separated "
                                           "(default: the paper's 1,3,5,...,29,30)."),
    draws: int = typer.Option(20, "--draws", help="Seeded random draws of n images per person, per n."),
    seed: int = typer.Option(0, "--seed", help="Seed of the draws."),
    tau: int = typer.Option(1, "--tau", help="Member iff score >= tau (1..number of templates)."),
    headline_n: int = typer.Option(30, "--headline-n", help="n of the headline numbers (ROC, AUC, TPR at low FPR)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Evaluation folder. Default: <report>/evaluation."),
    redact: bool = typer.Option(False, "--redact", help="Leave photo paths, other people's names (in each person's "
                                "drill-down) and full file paths out of the evaluation folder."),
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """The paper's evaluation protocol from a report's cached predictions: rates per n with intervals, ROC, AUC,
    TPR at low FPR, continuous scores beside paper mode, a model card and a per-person drill-down."""
    from idia_engine.engine.evaluate.protocol import PAPER_N_VALUES, EvalConfig, eval_out_dir, evaluate_report

    _setup_logging(verbose)
    with _errors_to_exit(out_dir or report_dir):
        config = EvalConfig(n_values=_parse_n_values(n_values) if n_values else PAPER_N_VALUES, draws=draws,
                            seed=seed, tau=tau, headline_n=headline_n, out_dir=out_dir, redact=redact)
        _check_outputs_beside_reports(eval_out_dir(report_dir, config), [report_dir])
        with _progress_bars(not quiet) as progress:
            result = evaluate_report(report_dir, labels, config, progress)
    print_evaluation(result.metrics, result.out_dir)


def _parse_n_values(text: str) -> tuple[int, ...]:
    from idia_engine.engine.errors import InputError

    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(f"--n must be comma-separated whole numbers like 1,3,5,30; got {text!r}") from None


def print_evaluation(metrics: dict, out_dir: Path) -> None:
    """The headline numbers of an evaluation as a table, and where its files are."""
    headline = metrics.get("headline")
    if headline:
        table = Table(title=f"paper protocol at n = {headline['n']} images per person "
                            f"({headline['draws']} draws, mean +- std; tau = {metrics['config']['tau']})")
        keys = ["TPR", "FPR", "accuracy", "AUC"]
        low = list(headline["TPR_at_FPR"])
        for col in keys + [f"TPR@{float(k) * 100:g}%FPR" for k in low]:
            table.add_column(col, justify="right")
        stats = [headline[k] for k in keys] + [headline["TPR_at_FPR"][k] for k in low]
        table.add_row(*[_mean_std(x) for x in stats])
        out.print(table)
    scores = metrics.get("scores")
    if scores:
        keys = list(next(iter(scores["full"].values()))["TPR_at_FPR"])
        table = Table(title="every score over all images (95 % bootstrap intervals over persons; only 'paper' is "
                            "the paper's)")
        for col in ["score", "AUC"] + [f"TPR@{float(k) * 100:g}%FPR" for k in keys]:
            table.add_column(col, justify="right")
        for name, full in scores["full"].items():
            table.add_row(name, _with_interval(full["AUC"]), *[_with_interval(full["TPR_at_FPR"][k]) for k in keys])
        out.print(table)
        for key, where in (("best_at_lowest_fpr", "the lowest these non-members resolve"), ("best_at_zero_fpr", "")):
            best = scores.get(key)
            if best:
                tprs = ", ".join(f"{k} {_fmt(v)}" for k, v in best["TPR"].items())
                verdict = (f"{best['best']} (not the paper's) beats paper mode there" if best["beats_paper"]
                           else "no continuous score beats paper mode there")
                out.print(f"at FPR <= {best['FPR']:g}{', ' + where if where else ''}: TPR {tprs}; {verdict}",
                          markup=False, highlight=False)
    for note in metrics.get("notes", []):
        out.print(f"note: {note}", markup=False, highlight=False)  # notes hold names: never markup
    out.print(Text.assemble("evaluation: ", (str(out_dir), "bold"), " (report.html, metrics.json, CSVs, PNGs)"),
              highlight=False)


def _with_interval(entry: dict) -> str:
    if entry.get("value") is None:
        return "n/a"
    if entry.get("low") is None:  # too few people for an interval
        return f"{entry['value']:.3f}"
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def _mean_std(stat: dict) -> str:
    if stat is None or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.3f} +- {stat['std']:.3f}"


@app.command("compare")
def compare_cmd(
    reports: list[Path] = typer.Argument(..., help="Two or more report directories written by query, of different "
                                         "models over the same persons and photos; the first is the baseline."),
    out_dir: Path = typer.Option(Path("idia-comparison"), "--out", help="Comparison folder (an earlier comparison "
                                 "there is replaced)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Ground truth (any format --labels of query reads). "
                                          "Default: the labels file every report used, if they used the same."),
    overlap: bool = typer.Option(False, "--overlap", help="Compare the persons and photos all reports share (and "
                                 "say what was left out) instead of refusing reports that differ."),
    tau: Optional[int] = typer.Option(None, "--tau", help="Member iff score >= tau. Default: the reports' own tau."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap intervals."),
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Compare models over the same people: per-person score changes, flipped decisions, McNemar and Wilcoxon."""
    from idia_engine.engine.compare.run import CompareConfig, compare_reports

    _setup_logging(verbose)
    with _errors_to_exit(out_dir):
        config = CompareConfig(out_dir=out_dir, labels_path=labels, overlap=overlap, tau=tau, seed=seed)
        _check_outputs_beside_reports(out_dir, reports)
        with _progress_bars(not quiet) as progress:
            result = compare_reports(reports, config, progress)
    print_comparison(result.comparison, result.out_dir)


def print_comparison(comparison: dict, out_dir: Path) -> None:
    """Each pair's flipped decisions and paired tests as a table, and where the comparison is."""
    table = Table(title=f"{comparison['alignment']['persons']} persons, {comparison['alignment']['photos']} photos, "
                        f"tau = {comparison['tau']}")
    for col in ("pair", "member -> non-member", "non-member -> member", "McNemar p", "mean score change",
                "Wilcoxon p"):
        table.add_column(col, justify="right")
    for pair in comparison["pairs"]:
        d, s = pair["decisions"], pair["scores"]["paper"]
        table.add_row(Text(f"{pair['other']} vs {pair['baseline']}"), str(d["member_to_non_member"]),
                      str(d["non_member_to_member"]), f"{d['p_value']:.3g}", _fmt(s["mean_change"]),
                      "n/a" if s["p_value"] is None else f"{s['p_value']:.3g}")
    out.print(table)
    for note in comparison.get("notes", []):
        out.print(f"note: {note}", markup=False, highlight=False)  # notes hold names and paths: never markup
    out.print(Text.assemble("comparison: ", (str(out_dir), "bold"),
                            " (comparison.html, comparison.json, persons.csv, PNGs)"), highlight=False)


@app.command("labels")
def labels_cmd(
    captions: list[Path] = typer.Argument(..., help="Training captions: .parquet, .txt (one per line) or .tsv files, "
                                          "or folders of them."),
    names_file: Path = typer.Option(..., "--names", help="The candidate names (a names file as build-index reads)."),
    out_file: Path = typer.Option(Path("labels.csv"), "--out", "-o", help="The labels CSV name,member,occurrences "
                                  "(its manifest goes beside it as <stem>.manifest.json)."),
    column: Optional[str] = typer.Option(None, "--column", help="Caption column (Parquet, TSV with a header). "
                                         "Default: the first of caption, TEXT, text; a TSV without one of them as "
                                         "header is read from its first column (CC3M)."),
    case_sensitive: bool = typer.Option(False, "--case-sensitive", help="Match names with their case (default: "
                                        "case-folded)."),
    min_occurrences: int = typer.Option(1, "--min-occurrences", help="Member iff the name is in at least this many "
                                        "captions."),
    workers: int = typer.Option(0, "--workers", help="Processes (0 = every CPU); with --ray local, Ray's CPUs."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run on a Ray cluster: host:port, ray://host:port, auto, "
                                      "or local (start one here)."),
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Ground truth from training captions: how many captions contain each name as whole words, and membership."""
    from idia_engine.engine.ground_truth.run import CaptionLabelsConfig, count_caption_labels

    _setup_logging(verbose)
    with _errors_to_exit(out_file):
        config = CaptionLabelsConfig(inputs=tuple(captions), names_file=names_file, out=out_file, column=column,
                                     case_sensitive=case_sensitive, min_occurrences=min_occurrences, workers=workers,
                                     ray=ray)
        with _progress_bars(not quiet) as progress:
            result = count_caption_labels(config, progress)
    m = result.manifest
    rate = m["timings"]["captions_per_s"]
    out.print(f"{m['rows_read']} captions, {m['names']['count']} names: {m['members']} members "
              f"(>= {m['matcher']['min_occurrences']} captions), {m['non_members']} non-members"
              + (f"; {rate:,.0f} captions/s" if rate else ""), markup=False, highlight=False)
    if m["nested_names"]["listed"]:
        out.print(f"note: {m['nested_names']['listed']} name(s) occur inside longer names; the manifest lists them",
                  markup=False, highlight=False)
    out.print(f"labels: {result.labels_path} (manifest {config.manifest_path})", markup=False, highlight=False)


@app.command("serve")
def serve_cmd(
    index_dir: Path = typer.Option(Path("idia-index"), "--index-dir", help="An index written by build-index."),
    reference: Optional[Path] = typer.Option(
        None, "--reference", help="A report `query` wrote over this index with labels: the page says where a score "
                                  "falls among its members and non-members."),
    reference_labels: Optional[Path] = typer.Option(
        None, "--reference-labels", help="Labels of --reference (default: the file its summary.json records)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: this machine only)."),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free one)."),
    auditor: bool = typer.Option(False, "--auditor", help="Answers also name the names the model picked for each "
                                 "photo (a reverse face search: for auditors of the model, not for the public)."),
    keep: Optional[Path] = typer.Option(None, "--keep", help="Write each request's photos and answer into a folder "
                                        "here (default: photos stay in memory and are written nowhere)."),
    max_photos: int = typer.Option(30, "--max-photos", help="Photos per request."),
    max_upload_mb: int = typer.Option(50, "--max-upload-mb", help="Largest request body in MB."),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", help="Largest photo in pixels (from its header, "
                                   "before decoding: decompression bombs are refused)."),
    top_k: int = typer.Option(10, "--top-k", help="Names kept per photo and template (the margin reads them)."),
    tau: int = typer.Option(1, "--tau", help="Member iff score (templates won by the name) >= tau."),
    resident_gib: float = typer.Option(8.0, "--resident-gib", help="Hold the name indexes in memory between requests "
                                       "when they take at most this many GiB (else open them per request)."),
    device: DeviceChoice = DeviceOpt,
    precision: Precision = PrecisionOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """A web page and JSON API over a built index: upload photos, type a name, learn whether the model picks it."""
    from idia_engine.engine.serve.server import serve
    from idia_engine.engine.serve.settings import ServeSettings

    _setup_logging(verbose)
    with _errors_to_exit():
        settings = ServeSettings(index_dir=index_dir, reference=reference, reference_labels=reference_labels,
                                 host=host, port=port, auditor=auditor, keep_dir=keep, max_photos=max_photos,
                                 max_upload_mb=max_upload_mb, max_pixels=max_pixels, top_k=top_k, tau=tau,
                                 device=device, precision=precision, resident_gib=resident_gib)
        serve(settings, on_ready=lambda url: out.print(f"serving {index_dir} at {url} (Ctrl-C stops; API docs at "
                                                       f"{url}docs)", markup=False, highlight=False))


@app.command("bench")
def bench_cmd(
    size: Annotated[list[int] | None, typer.Option("--size", help="Label-space size N (repeatable; default "
                                                      "1e3, 1e4, 1e5).")] = None,
    dim: Annotated[int | None, typer.Option("--dim", help="Embedding dimension (default 512; 64 with "
                                               "--quick).")] = None,
    persons: Annotated[int | None, typer.Option("--persons", help="Persons per size (30 images each).")] = None,
    methods: Annotated[str | None, typer.Option("--methods", help="Comma-separated methods (default all).")
                       ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default "
                                                    "benchmarks/results/<timestamp-host>).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda (GPU methods).")] = "auto",
    quick: Annotated[bool, typer.Option("--quick", help="A tiny run (seconds), for tests.")] = False,
    candidates: Annotated[int | None, typer.Option("--candidates", help="K' of the ensemble prefilter "
                                                       "(default 256).")] = None,
    member_fraction: Annotated[float | None, typer.Option(
        "--member-fraction", help="Share of persons the synthetic model knows, 0..1 (default 1): members' "
                                  "photos sit close to their true name, non-members' do not.")] = None,
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Benchmark search methods (throughput, agreement with exact decisions) on synthetic label spaces."""
    import dataclasses

    from idia_engine.benchmarks import run as bench
    from rich.markdown import Markdown

    _setup_logging(verbose)
    with _errors_to_exit(out_dir):
        config = bench.BenchConfig(**bench.QUICK) if quick else bench.BenchConfig()
        changes: dict = {"out": out_dir or bench.default_out(), "device": device}
        if size:
            changes["sizes"] = tuple(size)
        if dim is not None:
            changes["dim"] = dim
        if persons is not None:
            changes["persons"] = changes["persons_large"] = persons
        if candidates is not None:
            changes["candidates"] = candidates
        if member_fraction is not None:
            changes["member_fraction"] = member_fraction
        if methods:
            changes["methods"] = tuple(m.strip() for m in methods.split(",") if m.strip())
        config = dataclasses.replace(config, **changes)
        with _progress_bars(not quiet) as progress:
            result = bench.run_bench(config, progress=progress)
    out.print(Markdown(bench.markdown_table(result)))
    out.print(f"results: {config.out}", highlight=False)


@app.command("names")
def names_cmd(
    count: Annotated[int, typer.Option("--count", "-n", help="How many made-up names to write (>= 1).")],
    out_file: Annotated[Path, typer.Option("--out", "-o",
                                           help="The names file to write: a '#' header, then one name per line.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the draw (the paper's is 42): same seed and options, "
                                                     "same file.")] = 42,
    exclude: Annotated[Path | None, typer.Option(
        "--exclude", help="Names file of real names never to generate (compared ignoring case and extra spaces).")] = None,
    first_names: Annotated[int, typer.Option(
        "--first-names", help="Draw first names from the top K of each sex's US census list "
                              "(the lists hold 1,219 male and 4,275 female names).")] = 1000,
    surnames: Annotated[int, typer.Option(
        "--surnames", help="Draw surnames from the top K of the US census list (at most 88,799).")] = 1000,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the file at --out if it exists.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens (INFO level).")] = False,
) -> None:
    """Write made-up "First Last" candidate names: top-K census first names per sex x top-K surnames, half per sex."""
    from idia_engine.engine.candidates.made_up import NamesConfig, write_made_up_names

    _setup_logging(verbose)
    with _errors_to_exit(out_file):
        result = write_made_up_names(NamesConfig(out=out_file, count=count, seed=seed, exclude_file=exclude,
                                                 first_names=first_names, surnames=surnames, overwrite=overwrite))
    gen = result.generated
    per_sex = gen.per_sex
    excluded = f"; {gen.excluded:,} name(s) of {exclude} were in the pool and are left out" if exclude is not None else ""
    out.print(Text.assemble(f"{gen.count:,} made-up names ({per_sex['female']:,} female, {per_sex['male']:,} male) "
                            f"in {result.seconds:.2f} s -> ", (str(result.path), "bold"), excluded),
              highlight=False, soft_wrap=True)


def main() -> int:
    """The console entry point. Usage errors (an unknown option, a value of the wrong type) are one line on
    stderr and exit 2, like every other bad input; click would draw a box over several lines."""
    # Typer vendors its own click: find its exception base through a class it exports.
    click_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        rv = app(standalone_mode=False, prog_name="idia-engine")
    except click_error as e:
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        err.print(Text(f"error: {' '.join(e.format_message().split())}{hint}"), soft_wrap=True, highlight=False)
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        return 130
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
