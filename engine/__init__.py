"""The idia-engine library: the Identity Inference Attack on CLIP models, end to end.

Pipeline, one module per stage:
    names.py, templates.py   candidate names and prompt templates (inputs of build-index)
    model.py                 open_clip model loading, fingerprints, text and image encoding
    text_encoder.py          the fast text path: prompts run only up to their pooled token, no padding
    name_index.py            build_index / open_index: the per-template name index on disk (streaming,
                             resumable); approximate kinds keep raw vectors for exact re-ranking
    images.py                finding and decoding each person's photos (inputs of query)
    store.py                 the LMDB image-embedding store
    query.py                 run_query: embed, search, decide, report
    attack.py                the paper's unique-plurality vote rule and score
    labels.py, metrics.py    ground truth and confusion metrics
    textfiles.py             UTF-8 and CSV reading with file:line errors (templates, labels, manifests)
    report.py                the report directory and load_predictions
    evaluate.py              the paper's evaluation protocol over a report (eval_report.py: CSV, PNG, HTML)
    namegen.py               made-up candidate names from the US census lists
    world.py, synthetic.py   the demo's synthetic world: identities, membership, captions, photos
    training.py              training a small open_clip model from scratch on that world
    demo.py                  the offline demo: world, training, build-index, query, evaluate
"""

from importlib import import_module

# The main entry points, imported on first use: importing `idia_engine.engine.errors` (which the
# indexes package does) must not pull in the whole pipeline, or engine and indexes would import each
# other in a circle. evaluate_report (evaluate.py) and run_demo (demo.py) live in their modules.
_EXPORTS = {"IdiaError": "errors", "BuildConfig": "name_index", "build_index": "name_index",
            "open_index": "name_index", "QueryConfig": "query", "run_query": "query"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
