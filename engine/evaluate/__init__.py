"""evaluate: the paper's protocol over a finished report (n images per person, seeded draws, ROC).

    protocol.py        evaluate_report: draws for each n, the score sweep, the evaluation directory
    population.py      who is evaluated (labelled people with images), the seeded draws of n images
    statistics.py      rates per tau, ROC, AUC and TPR at low FPR of the paper-mode score
    intervals.py       uncertainty over people: Clopper-Pearson for rates, a stratified bootstrap for AUC
    scores.py          continuous scores beside paper mode (vote share, margin, calibrated): not the paper's
    score_table.py     every score side by side with intervals, and each person's scores
    render.py          the CSV files, PNG plots and the self-contained HTML page
"""
