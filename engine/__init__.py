"""The idia-engine library: the Identity Inference Attack on CLIP models, end to end.

Pipeline, one module per stage:
    names.py, templates.py   candidate names and prompt templates (inputs of build-index)
    model.py                 open_clip model loading, fingerprints, text and image encoding
    name_index.py            build_index / open_index: the per-template name index on disk
    images.py                finding and decoding each person's photos (inputs of query)
    store.py                 the LMDB image-embedding store
    query.py                 run_query: embed, search, decide, report
    attack.py                the paper's unique-plurality vote rule and score
    labels.py, metrics.py    ground truth and confusion metrics
    textfiles.py             UTF-8 and CSV reading with file:line errors (templates, labels, manifests)
    report.py                the report directory and load_predictions
    demo.py, synthetic.py    the offline demo: a tiny model and generated faces
"""

from .errors import IdiaError
from .name_index import BuildConfig, build_index, open_index
from .query import QueryConfig, run_query

__all__ = ["BuildConfig", "IdiaError", "QueryConfig", "build_index", "open_index", "run_query"]
