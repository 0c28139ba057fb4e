"""`query --embeddings DIR`: the attack over image embeddings computed elsewhere (clip-retrieval's layout).

Stages 1-3 of `query` (find photos, hash, encode) become one: read and check the folder against the index
(`embeddings.read_embedded_photos`). Stages 4-6 are `query`'s own (`query.run.score_rows`): the same
search, vote and report, so the report has the same files and format as one made from photos, with an
`embeddings` section in summary.json saying where the rows came from and that they were not verified.
The model is still loaded: its tokenizer matches persons to index names and its text tower encodes the
names of persons missing from the index, as for photos.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..disk.faults import fault_point
from ..index.reader import open_index
from ..model.load import LoadedModel, load_model
from ..progress import Progress
from ..query.images import ImageCollection
from ..query.labels import read_labels
from ..query.report import check_report_dir
from ..query.run import (
    QueryConfig,
    QueryInputs,
    QueryResult,
    RowsToScore,
    StageTimer,
    match_names,
    require_report_space,
    score_rows,
)
from ..query.votes import check_tau
from .embeddings import NORM_TOLERANCE, read_embedded_photos

log = logging.getLogger(__name__)


def run_embeddings_query(config: QueryConfig, progress: Progress, model: LoadedModel | None = None) -> QueryResult:
    """`run_query` for `config.embeddings`: everything checked before the model loads, nothing written on a
    refusal, the report swapped in whole."""
    source = config.embeddings
    timer = StageTimer()
    with timer.stage("inputs"):
        check_report_dir(config.out_dir)
        index = open_index(config.index_dir)
        fault_point("query.index.opened")
        check_tau(config.tau, len(index.templates))
        info = index.manifest.model_info
        photos = read_embedded_photos(source, info, index.manifest.embedding_dim, Path(config.index_dir))
        labels = read_labels(config.labels_file) if config.labels_file is not None else None
        collection = ImageCollection({p: [Path(x) for x in paths] for p, paths in photos.persons.items()}, [],
                                     source=str(photos.folder))
        inputs = QueryInputs(index, collection, labels, [p for p in collection.persons if index.name_id(p) is None])
    log.warning("scoring %d embeddings from %s as model %s's: idia-engine did not compute them and cannot verify "
                "them (summary.json says so under 'embeddings')", len(photos.rows), photos.folder, info.model)
    if photos.rows_normalised:
        log.warning("%d of the rows in %s are not unit-norm (|norm - 1| > %g) and were scaled to unit norm",
                    photos.rows_normalised, photos.folder, NORM_TOLERANCE)
    with timer.stage("load model"):
        if model is None:
            model = load_model(info.as_spec(), config.device, config.precision)
        index.check_model(model.info)
    with timer.stage("match names"):
        inputs = match_names(inputs, model, config)
    require_report_space(inputs, config, len(photos.rows))
    with inputs.index:
        rows = [(person, Path(path), sha) for person, path, sha in photos.rows]
        found = RowsToScore(rows, photos.images, [], duplicates=photos.duplicates)
        summary, run = score_rows(config, inputs, model, found, timer, progress,
                                  {"images_encoded": 0, "images_from_cache": 0, "undecodable_from_store": 0,
                                   "images_from_embeddings": len(rows)},
                                  {"embeddings": photos.summary(source.model)})
    return QueryResult(Path(config.out_dir), summary, run)
