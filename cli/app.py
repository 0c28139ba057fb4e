"""The `idia-engine` command line: a thin adapter over the library.

Each command parses options, builds a config, calls one library function and renders its result.
Library errors (IdiaError) become one line on stderr and the error's exit code (2 = bad input or usage,
1 = runtime failure); nothing else is printed for them.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from idia_engine.engine.errors import IdiaError
from idia_engine.engine.model import DEFAULT_MODEL, DEFAULT_PRETRAINED, DeviceChoice, ModelSpec, Precision
from idia_engine.indexes import DEFAULT_BACKEND

app = typer.Typer(
    name="idia-engine",
    help="Identity Inference Attack (IDIA) on CLIP models: does this model know this person?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", force=True,
                        handlers=[RichHandler(console=err, show_time=False, show_path=False)])
    # open_clip and huggingface_hub log at WARNING about things the engine already reports.
    for noisy in ("root", "huggingface_hub", "open_clip"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not verbose else logging.INFO)


@contextmanager
def _progress_bars(enabled: bool) -> Iterator:
    """A library progress callback drawing one rich bar per stage."""
    if not enabled:
        yield lambda stage, done, total: None
        return
    bars = Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err, transient=False)
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    with bars:
        yield update


@contextmanager
def _errors_to_exit() -> Iterator[None]:
    try:
        yield
    except IdiaError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: committed work is kept; rerun the same command to resume")
        raise typer.Exit(130) from None


VerboseOpt = typer.Option(False, "--verbose", "-v", help="Log what happens (INFO level).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")
DeviceOpt = typer.Option(DeviceChoice.AUTO, "--device", help="auto = CUDA when torch sees a GPU, else CPU.")
PrecisionOpt = typer.Option(Precision.FP32, "--precision", help="Forward-pass precision (fp16/bf16 run under autocast).")


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
    index_kind: str = typer.Option(DEFAULT_BACKEND, "--index", help="Index backend: flat (exact FAISS) or dense (torch)."),
    device: DeviceChoice = DeviceOpt,
    precision: Precision = PrecisionOpt,
    batch_size: int = typer.Option(256, "--batch-size", help="Prompts per forward pass."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an index already in --index-dir."),
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Encode every (template, name) prompt once and store the embeddings in a FAISS index."""
    from idia_engine.engine.name_index import BuildConfig, build_index
    from idia_engine.engine.templates import PAPER_TEMPLATES, load_templates

    _setup_logging(verbose)
    with _errors_to_exit():
        templates = load_templates(templates_file) if templates_file is not None else PAPER_TEMPLATES
        config = BuildConfig(names_file=names_file, index_dir=index_dir, model=ModelSpec(model, pretrained),
                             templates=templates, index_kind=index_kind, device=device, precision=precision,
                             batch_size=batch_size, overwrite=overwrite)
        with _progress_bars(not quiet) as progress:
            manifest = build_index(config, progress)
    enc = manifest.encode
    out.print(f"index written to [bold]{index_dir}[/]: {manifest.num_names} names x {manifest.num_templates} templates, "
              f"dim {manifest.embedding_dim}, {manifest.index_kind} index; {enc['prompts']} prompts in {enc['seconds']} s "
              f"on {enc['device']} ({enc['precision']})", highlight=False)
    if manifest.duplicates_dropped:
        out.print(f"{manifest.duplicates_dropped} duplicate name(s) dropped (first occurrence kept)")


@app.command("query")
def query_cmd(
    faces_dir: Optional[Path] = typer.Argument(None, help="faces/<Person Name>/<images>; '_' in a folder name reads as a space."),
    index_dir: Path = typer.Option(Path("idia-index"), "--index-dir", help="An index written by build-index."),
    out_dir: Path = typer.Option(Path("idia-report"), "--out", help="Report directory (an earlier report there is replaced)."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="CSV with columns path,name instead of a faces folder."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="CSV name,member (1/0, true/false, yes/no): adds metrics."),
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
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Embed each person's photos, search the name index per template, and decide membership (paper mode)."""
    from idia_engine.engine.query import QueryConfig, run_query

    _setup_logging(verbose)
    with _errors_to_exit():
        config = QueryConfig(index_dir=index_dir, faces_dir=faces_dir, image_manifest=manifest, out_dir=out_dir,
                             store_dir=store, labels_file=labels, top_k=top_k, tau=tau,
                             images_per_person=images_per_person, seed=seed, strict=strict, device=device,
                             precision=precision, batch_size=batch_size, workers=workers, store_dtype=store_dtype)
        with _progress_bars(not quiet) as progress:
            result = run_query(config, progress)
    _print_query_summary(result.summary, out_dir)


def _fmt(x) -> str:
    return "n/a" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def _print_query_summary(summary: dict, out_dir: Path) -> None:
    c = summary["counts"]
    out.print(f"{c['persons']} persons, {c['images_used']} images used ({c['images_encoded']} encoded, "
              f"{c['images_from_cache']} from cache, {c['images_skipped']} skipped), "
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
    out.print(f"report: [bold]{out_dir}[/] (persons.csv, modes.csv, predictions/, summary.json)", highlight=False)


@app.command("demo")
def demo_cmd(
    workdir: Path = typer.Option(Path("idia-demo"), "--workdir", help="Where the demo writes its model, data, index and report."),
    seed: int = typer.Option(0, "--seed"),
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Run the whole pipeline offline on a tiny RANDOM-weight model and generated faces (shows the pipeline, not the attack)."""
    from idia_engine.engine.demo import DemoConfig, run_demo

    _setup_logging(verbose)
    with _errors_to_exit():
        with _progress_bars(not quiet) as progress:
            result = run_demo(DemoConfig(workdir=workdir, seed=seed), progress)
    out.print("[bold]demo[/]: tiny open_clip model with random weights, generated faces, arbitrary labels. "
              "It shows the pipeline end to end; its decisions mean nothing.")
    out.print(f"index: {workdir / 'index'} ({result.index.num_names} names x {result.index.num_templates} templates)")
    _print_query_summary(result.query.summary, result.query.out_dir)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
