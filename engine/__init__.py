"""The idia-engine library: the Identity Inference Attack on CLIP models, end to end.

One folder per stage, in the order a name and a photo go through them (docs/attack.md specifies the
attack itself):

    candidates/   the candidate names and prompt templates             (input of build-index)
    model/        loading the model, encoding prompts and photos
    index/        build-index: every (template, name) prompt encoded into a name index on disk
    query/        query: photos -> embeddings (store) -> index search -> the vote -> the report
    evaluate/     the paper's evaluation protocol over a report, with intervals and continuous scores
    compare/      reports of different models over the same people: changes and paired tests
    demo/         the offline demo: a synthetic world and a CLIP trained on it
    disk/         atomic writes, locks, fault points, text inputs, versions (used by every stage)
    errors.py     the exceptions (one base class); progress.py: the progress callback

The main entry points are importable from here; they load on first use, so that importing
`idia_engine.engine.errors` (which `idia_engine.indexes` does) stays cheap.
"""

from importlib import import_module

_EXPORTS = {
    "IdiaError": "errors",
    "BuildConfig": "index.build", "build_index": "index.build", "open_index": "index.reader",
    "QueryConfig": "query.run", "run_query": "query.run", "load_predictions": "query.report",
    "EvalConfig": "evaluate.protocol", "evaluate_report": "evaluate.protocol",
    "CompareConfig": "compare.run", "compare_reports": "compare.run",
    "DemoConfig": "demo.run", "run_demo": "demo.run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
