"""What a regulator reads first on the report page: which model was attacked and how (the model card),
what the method can and cannot say, and per person the evidence behind the decision (the drill-down).

The drill-down shows, per person: score, decision and label; per template the plurality name, its votes
and the true name's votes; per photo the names that won its templates (how many templates, best cosine).

With `redact`, nothing meant to leave the lab shows a photo path or another person's name: photos are
shown by position and a SHA-256 prefix, names other than the person's own as "another name (1)", "(2)",
..., numbered per person, and file paths by their last part.
"""

from __future__ import annotations

import html
import json
import shlex
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..query.report import Predictions
from ..query.votes import NO_MODE, paper_mode_votes
from .population import Population

MAX_PERSONS_SHOWN = 500  # persons with a drill-down on the page; everyone is in person_scores.csv
TOP_NAMES_PER_PHOTO = 3  # names shown per photo, the most templates won first


@dataclass(frozen=True)
class PageContext:
    """What the report page needs beyond metrics.json: the report's own records and its people."""

    summary: dict  # the report's summary.json
    run: dict  # the report's run.json ({} if unreadable)
    pop: Population
    preds: Predictions
    redact: bool  # leave photo paths and other people's names out


def read_run(report_dir: Path) -> dict:
    try:
        run = json.loads((Path(report_dir) / "run.json").read_text(encoding="utf-8"))
        return run if isinstance(run, dict) else {}
    except (OSError, ValueError):
        return {}


def _path_text(path, redact: bool) -> str:
    if path is None:
        return "none"
    return Path(str(path)).name if redact else str(path)


def model_card(ctx: PageContext) -> list[tuple[str, str]]:
    """(field, value) rows: the model, its weights and fingerprint, the templates, candidates, index and
    exactness, precision, library versions, the command line."""
    s = ctx.summary
    model, index, counts = s.get("model") or {}, s.get("index") or {}, s.get("counts") or {}
    search, params = s.get("search") or {}, s.get("parameters") or {}
    templates = index.get("templates")
    n_templates = index.get("num_templates") or ctx.pop.n_templates
    exact = search.get("exact_decisions")
    versions = s.get("library_versions") or {}
    command = ctx.run.get("command_line")
    rows = [
        ("model (architecture)", _path_text(model.get("model"), ctx.redact)),
        ("weights", f"{_path_text(model.get('pretrained'), ctx.redact)} ({model.get('weights_source') or 'unknown'})"),
        ("weights fingerprint (SHA-256)", model.get("fingerprint") or "not recorded"),
        ("prompt templates", f"{n_templates}" + (": " + " | ".join(templates) if templates else "")),
        ("candidate names", f"{counts.get('candidates', len(ctx.preds.candidates))} "
                            f"({counts.get('candidates_added_for_this_run', 0)} added for this run)"),
        ("name index", f"{index.get('index_kind') or 'unknown'}, build {index.get('build_id') or 'unknown'}"),
        ("exactness", "not recorded" if exact is None else
         ("every decision equals the dense arg-max over all candidates" if exact else
          "APPROXIMATE: some top-1s were not certified (--no-fallback)")
         + (f"; decided by {search['decided_by']}" if search.get("decided_by") else "")),
        ("device and precision", f"{params.get('device', 'unknown')}, {params.get('precision', 'unknown')}"),
        ("top-k kept per photo and template", str(counts.get("top_k", params.get("top_k", "unknown")))),
        ("library versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "not recorded"),
        ("command line", (_redact_command(command) if ctx.redact else command) if command else "not recorded"),
    ]
    return rows


def _redact_command(command: str) -> str:
    """Paths in a command line by their last part."""
    try:
        parts = shlex.split(command)
    except ValueError:  # not a shell-quoted line: split on blanks
        parts = command.split()
    return shlex.join(Path(part).name if "/" in part else part for part in parts)


METHOD = ("For each photo and each prompt template, the model picks the candidate name whose prompt is most "
          "similar to the photo (the arg-max of cosine similarity over all candidates). Per template, the "
          "name picked most often over the person's photos must be the unique plurality and the person's own "
          "name: that template is a hit. The score is the number of hits (paper mode, Hintersdorf et al.); "
          "member iff score >= tau.")
LIMITATIONS = ("A member decision shows that the model ties this name to this face beyond the other candidates; it "
               "does not show how the model learnt it (a famous person is known from many sources). A non-member "
               "decision does not show absence: people seen rarely in training, or shown with few photos, are "
               "often missed. Rates carry 95 % intervals over the people evaluated; with few non-members low false-"
               "positive rates cannot be shown at all (see the notes). Scores other than paper mode are not the "
               "paper's and are labelled so.")


@dataclass(frozen=True)
class PersonView:
    name: str
    member: bool
    score: int
    decided_member: bool
    templates: list[tuple[int, str, str, int, int, bool]]  # (index, template text, mode, mode votes, true votes, hit)
    photos: list[tuple[str, int, str]]  # (photo, templates won by the true name, top names with counts and cosine)


def person_views(ctx: PageContext, tau: int, limit: int = MAX_PERSONS_SHOWN) -> list[PersonView]:
    pop, preds = ctx.pop, ctx.preds
    votes = paper_mode_votes(pop.top1, pop.person_of_image, pop.true_ids)
    templates = (ctx.summary.get("index") or {}).get("templates") or [f"template {t}" for t in range(pop.n_templates)]
    image_rows = _image_rows(ctx)
    photos_of = defaultdict(list)
    for m, p in enumerate(pop.person_of_image):
        photos_of[int(p)].append(m)
    views = []
    for p, name in enumerate(pop.names[:limit]):
        others: dict[int, str] = {}

        def shown(cand: int, own: int = int(pop.true_ids[p]), name: str = name, others: dict = others) -> str:
            if cand == own:
                return name
            if ctx.redact:
                return others.setdefault(cand, f"another name ({len(others) + 1})")
            return preds.candidates[cand]

        rows = []
        for t in range(pop.n_templates):
            mode = int(votes.modes[p, t])
            text = ("tie" if votes.mode_votes[p, t] > 0 else "none") if mode == NO_MODE else shown(mode)
            rows.append((t, templates[t] if t < len(templates) else f"template {t}", text,
                         int(votes.mode_votes[p, t]), int(votes.true_votes[p, t]), bool(votes.hits[p, t])))
        photos = []
        for j, m in enumerate(photos_of[p]):
            ids, cos = pop.topk_ids[m, :, 0], pop.topk_scores[m, :, 0]
            won: dict[int, list[float]] = defaultdict(list)
            for cand, c in zip(ids, cos):
                won[int(cand)].append(float(c))
            top = sorted(won.items(), key=lambda kv: (-len(kv[1]), -max(kv[1]), kv[0]))[:TOP_NAMES_PER_PHOTO]
            row = image_rows[m]
            label = f"photo {j + 1} · sha256 {row['sha256'][:12]}" if ctx.redact else row["path"]
            photos.append((label, int((ids == pop.true_ids[p]).sum()),
                           "; ".join(f"{shown(cand)} ×{len(c)} ({max(c):.3f})" for cand, c in top)))
        views.append(PersonView(name, bool(pop.members[p]), int(votes.scores[p]), bool(votes.scores[p] >= tau), rows,
                                photos))
    return views


def _image_rows(ctx: PageContext) -> list[dict[str, str]]:
    """images.csv rows of the population's images, in population order."""
    local = set(ctx.pop.names)
    return [row for row in ctx.preds.images if row["name"] in local]


def render_model_card(ctx: PageContext) -> str:
    esc = html.escape
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in model_card(ctx))
    return (f'<table class="card"><tbody>{rows}</tbody></table>'
            f"<h3>Method</h3><p>{esc(METHOD)}</p><h3>Limitations</h3><p>{esc(LIMITATIONS)}</p>")


def render_drilldown(ctx: PageContext, tau: int) -> str:
    esc = html.escape
    views = person_views(ctx, tau)
    parts = []
    if len(ctx.pop.names) > len(views):
        parts.append(f'<p class="muted">The first {len(views)} of {len(ctx.pop.names)} persons; everyone is in '
                     "person_scores.csv.</p>")
    for v in views:
        head = (f"{esc(v.name)}: score {v.score} of {len(v.templates)}, decided "
                f"{'member' if v.decided_member else 'non-member'}, labelled {'member' if v.member else 'non-member'}")
        templates = "".join(f"<tr><td>{t}</td><td>{esc(text)}</td><td>{esc(mode)}</td><td>{mv}</td><td>{tv}</td>"
                            f"<td>{'hit' if hit else ''}</td></tr>" for t, text, mode, mv, tv, hit in v.templates)
        photos = "".join(f"<tr><td>{esc(label)}</td><td>{won}</td><td>{esc(top)}</td></tr>"
                         for label, won, top in v.photos)
        parts.append(
            f'<details class="person"><summary>{head}</summary>'
            "<table><thead><tr><th>#</th><th>template</th><th>plurality name</th><th>its votes</th>"
            f"<th>true name's votes</th><th>hit</th></tr></thead><tbody>{templates}</tbody></table>"
            "<table><thead><tr><th>photo</th><th>templates won by the true name</th>"
            "<th>names that won its templates (templates, best cosine)</th></tr></thead>"
            f"<tbody>{photos}</tbody></table></details>")
    return "".join(parts)


def redacted_metrics_paths(metrics: dict) -> None:
    """With redact, the page and metrics.json name files by their last part only."""
    metrics["report"]["dir"] = Path(metrics["report"]["dir"]).name
    metrics["labels"]["file"] = Path(metrics["labels"]["file"]).name
    metrics["config"]["out_dir"] = Path(metrics["config"]["out_dir"]).name
    model = metrics["report"].get("model")
    if model:
        metrics["report"]["model"] = {**model, "model": _path_text(model.get("model"), True),
                                      "pretrained": _path_text(model.get("pretrained"), True)}
