"""evaluate: the paper's protocol over a finished report (n images per person, seeded draws, ROC).

    protocol.py        evaluate_report: draws for each n, the score sweep, the evaluation directory
    render.py          the CSV files, PNG plots and the self-contained HTML page
"""
