"""idia-engine's Python API: the Identity Inference Attack on CLIP models, from a notebook.

In memory (nothing is written to disk):

    model = idia_engine.load_model("ViT-B-32", pretrained="laion2b_s34b_b79k")   # or from_open_clip(...)
    result = idia_engine.attack(model, names, {"Full Name": [paths or PIL images], ...}, labels=...)
    result.to_pandas()            # one row per person: n_photos, score 0..21, decision (member iff score >= tau)
    result.modes_frame()          # one row per (person, template): the mode name, its votes, hit
    result.predictions_frame()    # one row per (photo, template, rank): name, cosine
    result.metrics                # TPR, FPR at tau, given labels

On files, at the scale of millions of names (what the CLI runs): `build_index(BuildConfig(...))`,
`run_query(QueryConfig(...))` (with `embeddings=EmbeddingsInput(...)`: embeddings in clip-retrieval's layout
instead of photos), `export_embeddings(ExportConfig(...))`, `evaluate_report(EvalConfig(...))`,
`run_demo(DemoConfig(...))`, `open_index`, `load_predictions`. Every error the library raises on purpose is an `IdiaError`.

Names load on first use: importing `idia_engine` (which every `idia_engine.engine...` import does first)
imports neither torch nor the engine.
"""

from importlib import import_module

_EXPORTS = {
    # in memory (this package)
    "load_model": ".model", "from_open_clip": ".model", "Model": ".model",
    "attack": ".run",
    "AttackResult": ".results", "PersonResult": ".results", "TemplateVote": ".results", "PhotoResult": ".results",
    "Metrics": ".results",
    # on files (the engine's entry points)
    "IdiaError": ".engine.errors",
    "BuildConfig": ".engine.index.build", "build_index": ".engine.index.build",
    "open_index": ".engine.index.reader",
    "QueryConfig": ".engine.query.run", "run_query": ".engine.query.run",
    "load_predictions": ".engine.query.report",
    "EvalConfig": ".engine.evaluate.protocol", "evaluate_report": ".engine.evaluate.protocol",
    "CompareConfig": ".engine.compare.run", "compare_reports": ".engine.compare.run",
    "DemoConfig": ".engine.demo.run", "run_demo": ".engine.demo.run",
    "ExportConfig": ".engine.interop.export", "export_embeddings": ".engine.interop.export",
    "EmbeddingsInput": ".engine.interop.embeddings",
    "PAPER_TEMPLATES": ".engine.candidates.templates",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # found once; later look-ups do not come here
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
