"""Rendering an evaluation: CSV tables, PNG plots and one self-contained HTML page.

Everything here is drawn from the metrics dict that evaluate.py computes (the content of metrics.json),
so a saved metrics.json could be rendered again without the report. Plots use matplotlib's Agg canvas
through `matplotlib.figure.Figure` (no pyplot, no global state, no display needed).

    evaluation/
      metrics.json             # every number, the configuration, counts, notes (written by evaluate.py)
      rates_by_n.csv           # per n: people counts, mean and std over draws of TP..TN, rates, AUC, TPR@FPR
      tau_sweep.csv            # per curve (headline n, full report) and tau 1..T: TPR, FPR, accuracy
      roc.csv                  # per curve and threshold T+1..0: FPR, TPR (the headline curve averaged per threshold)
      occurrence_tpr.csv       # members' TPR per occurrence bin and n (only with an occurrences column)
      scores.csv               # every score side by side: AUC and TPR at low FPR with bootstrap intervals
      scores_roc.csv           # ROC points of every score over the full report
      person_scores.csv        # per person: every score (written by protocol.py, not from metrics.json)
      scores_roc.png           # ROC of every score, linear and log-log
      rates_by_n.png           # TPR, FPR, accuracy vs n, with +- std bands
      roc.png, roc_loglog.png  # ROC on linear axes and on log-log axes (the LiRA convention)
      occurrence_heatmap.png   # TPR over (n images) x (occurrence bin) (only with occurrences)
      report.html              # headline numbers with intervals, scores side by side, the per-n table, plots
"""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from .drilldown import PageContext, render_drilldown, render_model_card

RATES_BY_N_CSV = "rates_by_n.csv"
TAU_SWEEP_CSV = "tau_sweep.csv"
ROC_CSV = "roc.csv"
OCCURRENCE_CSV = "occurrence_tpr.csv"
RATES_PNG = "rates_by_n.png"
ROC_PNG = "roc.png"
ROC_LOGLOG_PNG = "roc_loglog.png"
HEATMAP_PNG = "occurrence_heatmap.png"
REPORT_HTML = "report.html"
SCORES_CSV = "scores.csv"
SCORES_ROC_CSV = "scores_roc.csv"
SCORES_ROC_PNG = "scores_roc.png"

_NUMBER_KEYS = ("TP", "FN", "FP", "TN", "TPR", "FNR", "FPR", "TNR", "accuracy", "AUC")
_FULL_CURVE = "full report"


def write_evaluation_files(folder: Path, metrics: dict, page: PageContext | None = None) -> dict[str, str]:
    """Write the CSVs, plots and report.html into folder; return {file name: description}. With `page`, the
    HTML also carries the model card and the per-person drill-down."""
    folder = Path(folder)
    files = {
        RATES_BY_N_CSV: "per n: people evaluated and left out, mean and std over draws of TP, FN, FP, TN, TPR, "
                        "FNR, FPR, TNR, accuracy, AUC and TPR at low FPR",
        TAU_SWEEP_CSV: "TPR, FPR and accuracy per tau (member iff score >= tau), at the headline n (mean, std "
                       "over draws) and for the full report",
        ROC_CSV: "ROC points per score threshold T+1..0, at the headline n (averaged over draws per threshold) "
                 "and for the full report",
    }
    _write_rates_by_n(folder / RATES_BY_N_CSV, metrics)
    _write_tau_sweep(folder / TAU_SWEEP_CSV, metrics)
    _write_roc(folder / ROC_CSV, metrics)
    _write_scores(folder / SCORES_CSV, metrics)
    _write_scores_roc(folder / SCORES_ROC_CSV, metrics)
    files[SCORES_CSV] = ("every score side by side (paper mode and the continuous scores, which are not the "
                         "paper's): AUC and TPR at low FPR over the full report with bootstrap intervals over "
                         "persons, and mean +- std over draws at the headline n")
    files[SCORES_ROC_CSV] = "ROC points (threshold, FPR, TPR) of every score over the full report"
    images = {RATES_PNG: _plot_rates_by_n(metrics), ROC_PNG: _plot_roc(metrics),
              ROC_LOGLOG_PNG: _plot_roc_loglog(metrics), SCORES_ROC_PNG: _plot_scores_roc(metrics)}
    files[SCORES_ROC_PNG] = "ROC of every score over the full report, linear and log-log axes"
    files[RATES_PNG] = "TPR, FPR and accuracy vs n images per person, mean +- std over draws"
    files[ROC_PNG] = "ROC curves of the score (linear axes)"
    files[ROC_LOGLOG_PNG] = "ROC curves of the score on log-log axes (zeros drawn at the axis floor)"
    if metrics.get("occurrences"):
        _write_occurrences(folder / OCCURRENCE_CSV, metrics)
        images[HEATMAP_PNG] = _plot_occurrence_heatmap(metrics)
        files[OCCURRENCE_CSV] = "members' TPR at tau per training-occurrence bin and n (mean, std over draws)"
        files[HEATMAP_PNG] = "members' TPR over (n images) x (occurrence bin)"
    for name, png in images.items():
        (folder / name).write_bytes(png)
    (folder / REPORT_HTML).write_text(render_html(metrics, images, page), encoding="utf-8")
    files[REPORT_HTML] = ("one self-contained page: the model card, method and limitations, headline numbers with "
                          "intervals, every score side by side, the per-n table, the plots and a per-person "
                          "drill-down")
    return files


# ----------------------------------------------------------------------------------------------------
# CSV tables (an undefined number is an empty cell)
# ----------------------------------------------------------------------------------------------------

def _cell(x) -> str:
    return "" if x is None else (f"{x:.6g}" if isinstance(x, float) else str(x))


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows([[_cell(x) for x in row] for row in rows])


_RATE_KEYS = ("TPR", "FNR", "FPR", "TNR", "accuracy")


def _interval_cells(intervals: dict, key: str) -> list:
    entry = intervals.get(key)
    return [None, None] if entry is None else [entry["low"], entry["high"]]


def _write_rates_by_n(path: Path, metrics: dict) -> None:
    targets = list(metrics["by_n"][0]["TPR_at_FPR"]) if metrics["by_n"] else []
    header = ["n", "persons", "members", "non_members", "left_out", "draws"]
    header += [f"{k}_{s}" for k in _NUMBER_KEYS for s in ("mean", "std")]
    header += [f"TPR_at_FPR_{t}_{s}" for t in targets for s in ("mean", "std")]
    header += [f"{k}_{s}" for k in _RATE_KEYS for s in ("ci_low", "ci_high")]
    rows = []
    for e in metrics["by_n"]:
        row = [e["n"], e["persons"], e["members"], e["non_members"], e["left_out"], e["draws"]]
        row += [e[k][s] for k in _NUMBER_KEYS for s in ("mean", "std")]
        row += [e["TPR_at_FPR"][t][s] for t in targets for s in ("mean", "std")]
        row += [x for k in _RATE_KEYS for x in _interval_cells(e["intervals"], k)]
        rows.append(row)
    _write_csv(path, header, rows)


def _write_scores(path: Path, metrics: dict) -> None:
    section = metrics["scores"]
    targets = list(metrics["config"]["low_fpr_targets"])
    keys = [f"{t:g}" for t in targets]
    header = ["score", "definition", "AUC", "AUC_ci_low", "AUC_ci_high"]
    header += [f"TPR_at_FPR_{k}{s}" for k in keys for s in ("", "_ci_low", "_ci_high")]
    headline = section.get("headline")
    if headline:
        header += ["headline_n", "headline_AUC_mean", "headline_AUC_std"]
    rows = []
    for name, full in section["full"].items():
        row = [name, section["definitions"][name], full["AUC"]["value"], full["AUC"]["low"], full["AUC"]["high"]]
        row += [full["TPR_at_FPR"][k][x] for k in keys for x in ("value", "low", "high")]
        if headline:
            row += [headline["n"], headline[name]["AUC"]["mean"], headline[name]["AUC"]["std"]]
        rows.append(row)
    _write_csv(path, header, rows)


def _write_scores_roc(path: Path, metrics: dict) -> None:
    rows = [[name, p["threshold"], p["FPR"], p["TPR"]]
            for name, full in metrics["scores"]["full"].items() for p in full["roc"]]
    _write_csv(path, ["score", "threshold", "FPR", "TPR"], rows)


def _curves(metrics: dict) -> list[tuple[str, dict, bool]]:
    """(curve name, the dict holding tau_sweep and roc, whether its numbers are mean/std dicts)."""
    curves = []
    if metrics.get("headline"):
        h = metrics["headline"]
        curves.append((f"n = {h['n']} ({h['draws']} draws)", h, True))
    curves.append((_FULL_CURVE, metrics["full"], False))
    return curves


def _mean(x, averaged: bool):
    return x["mean"] if averaged else x


def _std(x, averaged: bool):
    return x["std"] if averaged else None


def _write_tau_sweep(path: Path, metrics: dict) -> None:
    rows = []
    for name, curve, avg in _curves(metrics):
        for p in curve["tau_sweep"]:
            rows.append([name, p["tau"]] + [f(p[k], avg) for k in ("TPR", "FPR", "accuracy") for f in (_mean, _std)])
    _write_csv(path, ["curve", "tau", "TPR_mean", "TPR_std", "FPR_mean", "FPR_std", "accuracy_mean",
                      "accuracy_std"], rows)


def _write_roc(path: Path, metrics: dict) -> None:
    rows = []
    for name, curve, avg in _curves(metrics):
        for p in curve["roc"]:
            rows.append([name, p["threshold"]] + [f(p[k], avg) for k in ("FPR", "TPR") for f in (_mean, _std)])
    _write_csv(path, ["curve", "threshold", "FPR_mean", "FPR_std", "TPR_mean", "TPR_std"], rows)


def _write_occurrences(path: Path, metrics: dict) -> None:
    occ = metrics["occurrences"]
    rows = []
    for entry in occ["by_n"]:
        for b, spec in enumerate(occ["bins"]):
            rows.append([spec["label"], spec["low"], spec["high"], entry["n"], entry["members"][b],
                         entry["TPR"][b]["mean"], entry["TPR"][b]["std"]])
    for b, spec in enumerate(occ["bins"]):
        rows.append([spec["label"], spec["low"], spec["high"], "all", spec["members"], occ["full"]["TPR"][b], None])
    _write_csv(path, ["bin", "low", "high", "n", "members", "TPR_mean", "TPR_std"], rows)


# ----------------------------------------------------------------------------------------------------
# Plots (PNG bytes)
# ----------------------------------------------------------------------------------------------------

def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _plot_rates_by_n(metrics: dict) -> bytes:
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    entries = [e for e in metrics["by_n"] if e["persons"]]
    for key, colour in (("TPR", "tab:green"), ("FPR", "tab:red"), ("accuracy", "tab:blue")):
        points = [(e["n"], e[key]["mean"], e[key]["std"]) for e in entries if e[key]["mean"] is not None]
        if not points:
            continue
        n, mean, std = (np.array(v, float) for v in zip(*points))
        ax.plot(n, mean, marker="o", markersize=3, color=colour, label=key)
        ax.fill_between(n, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color=colour, alpha=0.2)
    if metrics.get("headline"):
        ax.axvline(metrics["headline"]["n"], color="grey", linestyle=":", linewidth=1, label="headline n")
    tau, draws = metrics["config"]["tau"], metrics["config"]["draws"]
    ax.set(xlabel="n images per person", ylabel="rate", ylim=(-0.02, 1.02),
           title=f"rates at tau = {tau} (mean +- std over {draws} draws)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="best", fontsize="small")
    return _png(fig)


def _roc_points(curve: dict, averaged: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(fpr, tpr, fpr std, tpr std) of a curve, None when undefined (a class is empty)."""
    points = [(_mean(p["FPR"], averaged), _mean(p["TPR"], averaged),
               _std(p["FPR"], averaged) or 0.0, _std(p["TPR"], averaged) or 0.0) for p in curve["roc"]]
    if any(p[0] is None or p[1] is None for p in points):
        return None
    return tuple(np.array(v, float) for v in zip(*points))


def _drawable_curves(metrics: dict) -> list[tuple[str, tuple, bool]]:
    """(legend label, (fpr, tpr, fpr std, tpr std), averaged over draws) of every defined ROC curve."""
    out = []
    for name, curve, avg in _curves(metrics):
        points = _roc_points(curve, avg)
        if points is not None:
            auc = _format(curve["AUC"]) if avg else _format_value(curve["AUC"])
            out.append((f"{name}, AUC {auc}", points, avg))
    return out


def _roc_axes(n_curves: int, ax) -> None:
    if not n_curves:
        ax.text(0.5, 0.5, "undefined: needs both members and non-members", ha="center", va="center",
                transform=ax.transAxes)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize="small")


_CURVE_COLOURS = ("tab:blue", "tab:orange")


def _plot_roc(metrics: dict) -> bytes:
    """ROC on linear axes; the curve averaged over draws carries +- std error bars on both rates."""
    fig = Figure(figsize=(5.2, 5.0))
    ax = fig.subplots()
    curves = _drawable_curves(metrics)
    for (label, (fpr, tpr, fpr_std, tpr_std), avg), colour in zip(curves, _CURVE_COLOURS):
        if avg:
            ax.errorbar(fpr, tpr, xerr=fpr_std, yerr=tpr_std, color=colour, marker="o", markersize=3, capsize=2,
                        elinewidth=0.8, label=label)
        else:
            ax.plot(fpr, tpr, color=colour, marker="o", markersize=3, label=label)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="FPR", ylabel="TPR", title="ROC of the score")
    _roc_axes(len(curves), ax)
    return _png(fig)


def _log_floor(curves: list[tuple[str, tuple, bool]]) -> float:
    """Where a zero rate is drawn on the log axes: half the smallest non-zero rate plotted (0.5 if none).
    One floor for both axes keeps them on the same scale, so (0, 0) sits in the corner."""
    rates = np.concatenate([np.r_[fpr, tpr] for _, (fpr, tpr, _, _), _ in curves]) if curves else np.zeros(0)
    positive = rates[rates > 0]
    return float(positive.min()) / 2 if len(positive) else 0.5


def _plot_roc_loglog(metrics: dict) -> bytes:
    """ROC on log-log axes (LiRA's convention for TPR at low FPR). A zero rate cannot be drawn on a log
    axis, so it is drawn at the axis floor as a hollow marker: a point on the left edge is FPR = 0."""
    fig = Figure(figsize=(5.2, 5.0))
    ax = fig.subplots()
    curves = _drawable_curves(metrics)
    floor = _log_floor(curves)
    for (label, (fpr, tpr, _, _), _), colour in zip(curves, _CURVE_COLOURS):
        ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), color=colour, marker="o", markersize=3, label=label)
        clipped = (fpr <= 0) | (tpr <= 0)
        ax.scatter(np.maximum(fpr[clipped], floor), np.maximum(tpr[clipped], floor), s=40, facecolors="white",
                   edgecolors=colour, zorder=3)
    ax.plot([floor, 1], [floor, 1], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlim=(floor / 1.5, 1.1), ylim=(floor / 1.5, 1.1), xlabel=f"FPR (hollow: 0, drawn at {floor:.2g})",
           ylabel=f"TPR (hollow: 0, drawn at {floor:.2g})", title="ROC of the score, log-log")
    _roc_axes(len(curves), ax)
    return _png(fig)


_SCORE_COLOURS = ("tab:blue", "tab:green", "tab:purple", "tab:red")


def _plot_scores_roc(metrics: dict) -> bytes:
    """Every score's ROC over the full report: linear axes on the left, log-log (zeros at the floor) right."""
    fig = Figure(figsize=(10.4, 5.0))
    linear, loglog = fig.subplots(1, 2)
    curves = []
    for name, full in metrics["scores"]["full"].items():
        points = [(p["FPR"], p["TPR"]) for p in full["roc"]]
        if any(f is None or t is None for f, t in points):
            continue
        fpr, tpr = (np.array(v, float) for v in zip(*points))
        auc = full["AUC"]
        label = name if auc["value"] is None else f"{name}, AUC {_with_interval(auc['value'], auc)}"
        curves.append((label, fpr, tpr))
    positive = np.concatenate([np.r_[f, t] for _, f, t in curves]) if curves else np.zeros(0)
    positive = positive[positive > 0]
    floor = float(positive.min()) / 2 if len(positive) else 0.5
    for (label, fpr, tpr), colour in zip(curves, _SCORE_COLOURS):
        linear.step(fpr, tpr, where="post", color=colour, label=label)
        loglog.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), color=colour, drawstyle="steps-post")
    linear.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    linear.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="FPR", ylabel="TPR",
               title="every score, full report (brackets: 95 % bootstrap)")
    loglog.plot([floor, 1], [floor, 1], color="grey", linestyle="--", linewidth=1)
    loglog.set_xscale("log")
    loglog.set_yscale("log")
    loglog.set(xlim=(floor / 1.5, 1.1), ylim=(floor / 1.5, 1.1), xlabel=f"FPR (0 drawn at {floor:.2g})",
               ylabel=f"TPR (0 drawn at {floor:.2g})", title="log-log")
    for ax in (linear, loglog):
        ax.grid(alpha=0.3, which="both")
    if curves:
        linear.legend(loc="lower right", fontsize="x-small")
    else:
        linear.text(0.5, 0.5, "undefined: needs both members and non-members", ha="center", va="center",
                    transform=linear.transAxes)
    return _png(fig)


def _plot_occurrence_heatmap(metrics: dict) -> bytes:
    occ = metrics["occurrences"]
    ns = [e["n"] for e in occ["by_n"]]
    grid = np.array([[np.nan if x["mean"] is None else x["mean"] for x in e["TPR"]] for e in occ["by_n"]], float).T
    labels = [b["label"] for b in occ["bins"]]
    fig = Figure(figsize=(max(5.0, 0.45 * len(ns) + 2.5), max(3.0, 0.4 * len(labels) + 1.8)))
    ax = fig.subplots()
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid), origin="lower", aspect="auto", vmin=0, vmax=1, cmap=cmap)
    ax.set_xticks(range(len(ns)), [str(n) for n in ns])
    ax.set_yticks(range(len(labels)), labels)
    if grid.size <= 400:
        for (row, col), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if value > 0.6 else "white")
    ax.set(xlabel="n images per person", ylabel=f"training occurrences ({occ['binning']})",
           title=f"members' TPR at tau = {metrics['config']['tau']} (grey: nobody)")
    fig.colorbar(image, ax=ax, label="TPR (mean over draws)")
    return _png(fig)


# ----------------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------------

def _format_value(x) -> str:
    return "n/a" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def _format(stat: dict) -> str:
    """'mean ± std', or 'n/a' when undefined."""
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _with_interval(value, entry: dict | None) -> str:
    """'0.500 [0.013, 0.987]' (the interval over people), or the bare value when there is none."""
    if value is None:
        return "n/a"
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    if entry is None or entry.get("low") is None:
        return text
    return f"{text} [{entry['low']:.3f}, {entry['high']:.3f}]"


def _interval_table(metrics: dict) -> str:
    """The full report's rates at tau, each with its Clopper-Pearson interval over people."""
    f = metrics["full"]
    level = f"{100 * metrics['config']['confidence']:g} %"
    rows = []
    for key in _RATE_KEYS:
        entry = f["intervals"].get(key)
        count = "" if entry is None else f"{entry['k']} of {entry['n']}"
        rows.append([key, count, _with_interval(f[key], entry)])
    return _table(["rate (full report, tau = " + str(metrics["config"]["tau"]) + ")", "people",
                   f"value [{level} Clopper-Pearson]"], rows)


def _scores_table(metrics: dict) -> str:
    section = metrics["scores"]
    keys = [f"{t:g}" for t in metrics["config"]["low_fpr_targets"]]
    headline = section.get("headline")
    header = ["score", "AUC [95 % bootstrap]"] + [f"TPR at FPR ≤ {k}" for k in keys]
    if headline:
        header.append(f"AUC at n = {headline['n']} (mean ± std over draws)")
    rows = []
    for name, full in section["full"].items():
        row = [name, _with_interval(full["AUC"]["value"], full["AUC"])]
        row += [_with_interval(full["TPR_at_FPR"][k]["value"], full["TPR_at_FPR"][k]) for k in keys]
        if headline:
            row.append(_format(headline[name]["AUC"]))
        rows.append(row)
    return _table(header, rows)


def _scores_paragraph(metrics: dict) -> str:
    section = metrics["scores"]
    items = "".join(f"<li><b>{html.escape(name)}</b>: {html.escape(text)}</li>"
                    for name, text in section["definitions"].items())
    verdict = ""
    for key, where in (("best_at_lowest_fpr", " (the lowest this population resolves: one false positive)"),
                       ("best_at_zero_fpr", "")):
        best = section.get(key)
        if best:
            tprs = ", ".join(f"{k} {_format_value(v)}" for k, v in best["TPR"].items())
            verdict += (f"<p>At FPR ≤ {best['FPR']:.3g}{where}, TPR: {html.escape(tprs)}. "
                        + (f"{html.escape(best['best'])} (not the paper's) beats paper mode there."
                           if best["beats_paper"] else "No continuous score beats paper mode there.") + "</p>")
    censored = section["censoring"]["margin_pairs_censored"]
    censoring = ("" if censored is None else
                 f"<p class=\"muted\">margin: {100 * censored:.1f} % of (photo, template) pairs have the true name "
                 f"outside the top-{section['censoring']['top_k']}; there the margin is an upper bound.</p>")
    return f"<ul>{items}</ul>{verdict}{censoring}<p class=\"muted\">{html.escape(section['interval']['method'])}</p>"


def _headline_table(metrics: dict) -> str:
    targets = list(metrics["full"]["TPR_at_FPR"])
    header = ["", "persons (members / non-members)", "TPR", "FPR", "accuracy", "AUC"]
    header += [f"TPR at FPR ≤ {t}" for t in targets]
    rows = []
    h = metrics.get("headline")
    if h:
        rows.append([f"n = {h['n']}, mean ± std over {h['draws']} draws",
                     f"{h['persons']} ({h['members']} / {h['non_members']})"]
                    + [_format(h[k]) for k in ("TPR", "FPR", "accuracy", "AUC")]
                    + [_format(h["TPR_at_FPR"][t]) for t in targets])
    f = metrics["full"]
    rows.append([f"{_FULL_CURVE} (all images)", f"{f['persons']} ({f['members']} / {f['non_members']})"]
                + [_format_value(f[k]) for k in ("TPR", "FPR", "accuracy", "AUC")]
                + [_format_value(f["TPR_at_FPR"][t]) for t in targets])
    return _table(header, rows)


def _per_n_table(metrics: dict) -> str:
    keys = ("TPR", "FNR", "FPR", "TNR", "accuracy", "AUC")
    header = ["n", "persons", "members", "non-members", "left out"] + list(keys)
    rows = [[str(e["n"]), str(e["persons"]), str(e["members"]), str(e["non_members"]), str(e["left_out"])]
            + [_format(e[k]) for k in keys] for e in metrics["by_n"]]
    return _table(header, rows)


def _occurrence_table(metrics: dict) -> str:
    occ = metrics["occurrences"]
    header = ["occurrences", "members"] + [f"n = {e['n']}" for e in occ["by_n"]] + ["all images"]
    rows = [[b["label"], str(b["members"])] + [_format(e["TPR"][i]) for e in occ["by_n"]]
            + [_format_value(occ["full"]["TPR"][i])] for i, b in enumerate(occ["bins"])]
    return _table(header, rows)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:80em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%;margin:.5em 1em .5em 0}
.muted{color:#666}table.card th{text-align:left}table.card td{text-align:left}details.person{margin:.3em 0}
details.person summary{cursor:pointer}"""


def render_html(metrics: dict, images: dict[str, bytes], page: PageContext | None = None) -> str:
    """One self-contained page: every PNG is embedded as a base64 data URI. Without `page` (a metrics.json
    rendered again on its own), no model card and no drill-down."""
    cfg, rep, labels = metrics["config"], metrics["report"], metrics["labels"]
    esc = html.escape
    figures = "".join(f'<img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
                      for name, png in images.items())
    notes = "".join(f"<li>{esc(n)}</li>" for n in metrics["notes"])
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>IDIA evaluation</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>Identity inference attack: evaluation</h1>",
        (f'<p class="muted">report {esc(rep["dir"])} &middot; {rep["templates"]} templates &middot; '
         f'{rep["candidates"]} candidate names &middot; labels {esc(labels["file"])} &middot; '
         f'evaluated {esc(metrics["created_at"])}</p>'),
        (f"<p>Decision: member iff score &ge; tau = {cfg['tau']} (score = templates whose unique plurality over "
         f"a person's n images is the true name; higher = more likely a member). {cfg['draws']} draws per n, "
         f"seed {cfg['seed']}; std is the population std over draws.</p>"),
    ]
    if page is not None:
        parts += ["<h2>Model card</h2>", render_model_card(page)]
    parts += [
        "<h2>Headline</h2>", _headline_table(metrics), _interval_table(metrics),
        "<h2>Scores side by side</h2>", _scores_table(metrics), _scores_paragraph(metrics),
    ]
    if notes:
        parts += ["<h2>Notes</h2>", f"<ul>{notes}</ul>"]
    parts += ["<h2>Plots</h2>", f"<div>{figures}</div>", "<h2>Rates per n images</h2>", _per_n_table(metrics)]
    if metrics.get("occurrences"):
        parts += ["<h2>Members' TPR per training-occurrence bin</h2>", _occurrence_table(metrics)]
    if page is not None:
        parts += ["<h2>Persons</h2>", render_drilldown(page, cfg["tau"])]
    parts.append("</body></html>\n")
    return "\n".join(parts)
