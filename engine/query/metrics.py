"""Confusion counts and rates of membership decisions against ground truth."""

from __future__ import annotations

import numpy as np


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None  # None (JSON null) when undefined, never a made-up 0


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
        "TPR": _rate(tp, tp + fn), "FPR": _rate(fp, fp + tn), "TNR": _rate(tn, tn + fp), "FNR": _rate(fn, fn + tp),
        "accuracy": _rate(tp + tn, len(d)), "precision": _rate(tp, tp + fp),
    }
