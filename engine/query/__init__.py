"""query: each person's photos against the name index, decided per person.

    run.py             run_query: inputs, hash, encode, search, decide, report (one function per stage)
    images.py          finding each person's photos and decoding them
    inputs/            several faces folders, --aliases, a FaceScrub --faces-list, --crop to face boxes
    store.py           the LMDB store of image embeddings (keyed by model and image bytes)
    search.py          the search of every template's index (exact, certified, or brute-force fallback)
    votes.py           the paper's vote: unique plurality per template, score 0..T
    labels.py          ground truth (name, member[, occurrences])
    metrics.py         confusion counts and rates: the one definition of TPR, FPR, ...
    report.py          the report directory (persons.csv, modes.csv, predictions/, summary.json)
"""
