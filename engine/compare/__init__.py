"""compare: reports of different models over the same persons and photos, side by side.

    inputs.py          open the reports, refuse differing persons / photos / candidates (or keep the overlap)
    paired.py          McNemar's exact test on decisions, the Wilcoxon signed-rank test on scores
    run.py             compare_reports: per-person changes, paired tests, rates with intervals, the folder
    render.py          persons.csv, the plots and the self-contained HTML page
"""
