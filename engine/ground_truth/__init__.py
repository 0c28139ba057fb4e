"""ground_truth: membership labels from training captions (`idia-engine labels`).

    captions.py        caption files as they are stored (Parquet, text, TSV), in pieces a job splits into
    matcher.py         whole-word matching of 10^5-10^6 names at once (Aho-Corasick), and what it means
    workers.py         counting pieces in processes of this machine or on a Ray cluster (Ray Data)
    run.py             count_caption_labels: the job, resumable per file, the labels CSV and its manifest
"""
