"""Confusion counts and rates of membership decisions against ground truth."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def rate(num: int, den: int) -> float | None:
    """num / den, None (JSON null) when den is 0: undefined, never a made-up 0. The one definition of a rate."""
    return num / den if den else None


def rate_or_nan(num, den) -> float:
    """`rate` for float arrays: NaN when undefined (written as null in JSON)."""
    r = rate(float(num), float(den))
    return float("nan") if r is None else r


def confusion_metrics(decisions: np.ndarray, members: np.ndarray) -> dict[str, float | int | None]:
    """decisions, members: bool [P] (True = member). Returns TP/FP/TN/FN and TPR, FPR, TNR, FNR,
    accuracy, precision; a rate with a zero denominator is None."""
    d = np.asarray(decisions, bool)
    y = np.asarray(members, bool)
    tp, fp = int((d & y).sum()), int((d & ~y).sum())
    tn, fn = int((~d & ~y).sum()), int((~d & y).sum())
    return {
        "persons": int(len(d)), "members": int(y.sum()), "non_members": int((~y).sum()),
        "TP": tp, "FP": fp, "TN": tn, "FN": fn,
        "TPR": rate(tp, tp + fn), "FPR": rate(fp, fp + tn), "TNR": rate(tn, tn + fp), "FNR": rate(fn, fn + tp),
        "accuracy": rate(tp + tn, len(d)), "precision": rate(tp, tp + fp),
    }


def label_metrics(persons: list[str], n_images: np.ndarray, decisions: np.ndarray, labels: dict[str, bool] | None
                  ) -> tuple[dict | None, dict | None]:
    """(confusion metrics over the labelled persons with at least one usable image, who was left out and why);
    (None, None) without labels."""
    if labels is None:
        return None, None
    decided = [i for i, p in enumerate(persons) if p in labels and n_images[i] > 0]
    info = {
        "labelled_persons": len(decided),
        "unlabelled_persons": sorted(p for p in persons if p not in labels),
        "labelled_without_images": sorted(p for i, p in enumerate(persons) if p in labels and n_images[i] == 0),
        "labels_for_unknown_names": sorted(set(labels) - set(persons)),
    }
    if info["labels_for_unknown_names"]:
        log.warning("labels name %d person(s) that were not queried (e.g. %r)",
                    len(info["labels_for_unknown_names"]), info["labels_for_unknown_names"][0])
    idx = np.array(decided, np.int64)
    members = np.array([labels[persons[i]] for i in decided], bool)
    return confusion_metrics(decisions[idx] if len(idx) else np.zeros(0, bool), members), info
