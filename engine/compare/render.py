"""Rendering a comparison: the per-person table, two plots and one self-contained HTML page.

    comparison/
      comparison.json        # every number (written by run.py)
      persons.csv            # per person: each model's score, decision, vote share; change and flip vs baseline
      score_scatter.png      # baseline score vs each other model's, per person (jittered; colour = label)
      score_change.png       # histogram of the paper-score change per person, by label
      comparison.html        # models, paired tests, rates with intervals, flipped decisions, the plots
"""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

PERSONS_CSV = "persons.csv"
SCATTER_PNG = "score_scatter.png"
CHANGE_PNG = "score_change.png"
COMPARISON_HTML = "comparison.html"


def write_comparison_files(folder: Path, comparison: dict, persons: dict) -> dict[str, str]:
    """Write persons.csv, the plots and comparison.html into folder; return {file name: description}."""
    folder = Path(folder)
    with open(folder / PERSONS_CSV, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(persons["header"])
        w.writerows([[f"{x:.9g}" if isinstance(x, float) else x for x in row] for row in persons["rows"]])
    images = {SCATTER_PNG: _plot_scatter(comparison, persons), CHANGE_PNG: _plot_change(comparison, persons)}
    for name, png in images.items():
        (folder / name).write_bytes(png)
    (folder / COMPARISON_HTML).write_text(render_html(comparison, persons, images), encoding="utf-8")
    return {PERSONS_CSV: "one row per compared person: each model's paper score, decision and vote share, the "
                         "score change against the baseline and whether the decision flipped",
            SCATTER_PNG: "each person's paper score under the baseline vs under each other model",
            CHANGE_PNG: "histogram of the paper-score change against the baseline, by label",
            COMPARISON_HTML: "one self-contained page: the models, paired tests, rates with intervals, the plots "
                             "and the flipped decisions"}


def _column(persons: dict, name: str) -> list:
    i = persons["header"].index(name)
    return [row[i] for row in persons["rows"]]


def _groups(persons: dict) -> list[tuple[str, np.ndarray, str]]:
    """(legend, mask, colour) per label group, or everyone when there are no labels."""
    n = len(persons["rows"])
    if "label" not in persons["header"]:
        return [("everyone", np.ones(n, bool), "tab:blue")]
    label = np.array(_column(persons, "label"))
    return [(text, label == value, colour) for text, value, colour in
            (("members", "member", "tab:green"), ("non-members", "non-member", "tab:red"),
             ("unlabelled", "", "tab:grey")) if (label == value).any()]


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _plot_scatter(comparison: dict, persons: dict) -> bytes:
    labels = [r["label"] for r in comparison["reports"]]
    others = labels[1:]
    fig = Figure(figsize=(4.6 * len(others), 4.4))
    axes = np.atleast_1d(fig.subplots(1, len(others)))
    base = np.array(_column(persons, f"score_{labels[0]}"), float)
    t = comparison["reports"][0]["templates"]
    jitter = np.random.default_rng(0).uniform(-0.2, 0.2, size=(2, len(base)))  # fixed: the plot is reproducible
    for ax, other in zip(axes, others):
        y = np.array(_column(persons, f"score_{other}"), float)
        for text, mask, colour in _groups(persons):
            ax.scatter(base[mask] + jitter[0, mask], y[mask] + jitter[1, mask], s=12, alpha=0.6, color=colour,
                       label=text)
        ax.plot([0, t], [0, t], color="grey", linestyle="--", linewidth=1)
        ax.axhline(comparison["tau"] - 0.5, color="grey", linestyle=":", linewidth=1)
        ax.axvline(comparison["tau"] - 0.5, color="grey", linestyle=":", linewidth=1)
        ax.set(xlim=(-0.6, t + 0.6), ylim=(-0.6, t + 0.6), xlabel=f"score under {labels[0]} (baseline)",
               ylabel=f"score under {other}", title=f"{other} vs {labels[0]} (dotted: tau)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
    return _png(fig)


def _plot_change(comparison: dict, persons: dict) -> bytes:
    labels = [r["label"] for r in comparison["reports"]]
    others = labels[1:]
    t = comparison["reports"][0]["templates"]
    fig = Figure(figsize=(4.6 * len(others), 3.8))
    axes = np.atleast_1d(fig.subplots(1, len(others)))
    bins = np.arange(-t - 0.5, t + 1.5)
    for ax, other in zip(axes, others):
        change = np.array(_column(persons, f"change_{other}"), float)
        groups = _groups(persons)
        ax.hist([change[m] for _, m, _ in groups], bins=bins, color=[c for _, _, c in groups],
                label=[g for g, _, _ in groups], stacked=True)
        ax.axvline(0, color="grey", linewidth=1)
        ax.set(xlabel=f"score change, {other} - {labels[0]}", ylabel="persons", title=f"{other} vs {labels[0]}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
    return _png(fig)


# ----------------------------------------------------------------------------------------------------
# HTML (every value from a file or a user is escaped)
# ----------------------------------------------------------------------------------------------------

def _fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1e-3 and x != 0 else f"{x:.3f}"
    return str(x)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c) if not isinstance(c, str) else c)}</td>"
                                    for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _interval(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    if entry.get("low") is None:  # too few people for an interval
        return f"{entry['value']:.3f}"
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def _models_table(comparison: dict) -> str:
    header = ["model", "architecture", "weights", "fingerprint", "index", "candidates", "decided member",
              "mean score"]
    labelled = comparison["labels"] is not None
    if labelled:
        header += ["TPR [95 % CP]", "FPR [95 % CP]", "AUC paper [bootstrap]", "AUC vote share [bootstrap]"]
    rows = []
    for r in comparison["reports"]:
        m = comparison["models"][r["label"]]
        model = r["model"] or {}
        row = [r["label"], model.get("model") or "", model.get("pretrained") or "",
               (model.get("fingerprint") or "")[:16], r["index_kind"] or "", r["candidates"], m["decided_member"],
               m["mean_score"]]
        if labelled:
            row += [_interval(m["rates"]["TPR"]), _interval(m["rates"]["FPR"]), _interval(m["AUC"]["paper"]),
                    _interval(m["AUC"]["vote_share"])]
        rows.append(row)
    return _table(header, rows)


def _tests_rows(name: str, tests: dict) -> list[list]:
    d, paper, share = tests["decisions"], tests["scores"]["paper"], tests["scores"]["vote_share"]
    return [[name, d["persons"], d["member_to_non_member"], d["non_member_to_member"], d["p_value"],
             paper["mean_change"], paper["fell"], paper["rose"], paper["p_value"], share["mean_change"],
             share["p_value"]]]


def _pairs_table(comparison: dict) -> str:
    header = ["pair / group", "persons", "member -> non-member", "non-member -> member", "McNemar exact p",
              "mean score change", "scores fell", "scores rose", "Wilcoxon p (score)", "mean vote-share change",
              "Wilcoxon p (vote share)"]
    rows = []
    for pair in comparison["pairs"]:
        title = f"{pair['other']} vs {pair['baseline']}"
        rows += _tests_rows(f"{title}: everyone", pair)
        for group, tests in (pair.get("groups") or {}).items():
            rows += _tests_rows(f"{title}: {group.replace('_', '-')}", tests)
    return _table(header, rows)


def _flipped_table(persons: dict, comparison: dict) -> str:
    labels = [r["label"] for r in comparison["reports"]]
    header = persons["header"]
    rows = []
    for row in persons["rows"]:
        flips = [row[header.index(f"flipped_{other}")] for other in labels[1:]]
        if any(flips):
            rows.append([row[0]] + [row[header.index(f"score_{label}")] for label in labels] + flips)
    if not rows:
        return "<p>No decision flipped.</p>"
    return _table(["person"] + [f"score {label}" for label in labels] + [f"flip {o}" for o in labels[1:]], rows)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:90em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%;margin:.5em 1em .5em 0}
.muted{color:#666}"""


def render_html(comparison: dict, persons: dict, images: dict[str, bytes]) -> str:
    esc = html.escape
    figures = "".join(f'<img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
                      for name, png in images.items())
    a = comparison["alignment"]
    labels = comparison["labels"]
    notes = "".join(f"<li>{esc(n)}</li>" for n in comparison["notes"])
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', "<title>IDIA model comparison</title>",
        f"<style>{_CSS}</style></head><body>", "<h1>Identity inference attack: model comparison</h1>",
        (f'<p class="muted">{a["persons"]} persons, {a["photos"]} photos shared by every report'
         f'{" (--overlap)" if a["overlap"] else ""} &middot; tau = {comparison["tau"]} &middot; '
         f'labels {esc(labels["file"]) if labels else "none"} &middot; compared {esc(comparison["created_at"])}</p>'),
        (f"<p>The first model, {esc(comparison['reports'][0]['label'])}, is the baseline. Decisions: member iff the "
         "paper-mode score (templates whose unique plurality is the true name) &ge; tau. Paired tests: McNemar's "
         "exact test on the decisions, the Wilcoxon signed-rank test on the scores; each person is their own "
         "control.</p>"),
        "<h2>Models</h2>", _models_table(comparison),
        "<h2>Paired tests</h2>", _pairs_table(comparison),
    ]
    if notes:
        parts += ["<h2>Notes</h2>", f"<ul>{notes}</ul>"]
    parts += ["<h2>Plots</h2>", f"<div>{figures}</div>", "<h2>Flipped decisions</h2>",
              _flipped_table(persons, comparison), "</body></html>\n"]
    return "\n".join(parts)
