"""The Python API (`import idia_engine`): the in-memory attack against build-index + query, and the README example."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import idia_engine
import numpy as np
import pytest
from idia_engine.engine.errors import InputError
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
TEMPLATES = idia_engine.PAPER_TEMPLATES[:4]  # a few of the paper's: the comparison needs no more, and is 5x faster
README_MARKER = "<!-- tests/test_api.py runs the next code block verbatim -->"


@pytest.fixture(scope="module")
def file_run(world, tiny_model, tiny_spec, tmp_path_factory):
    """build-index (flat, 4 of the paper's templates) + query over the world's faces, with the first person left
    out of the names (query adds them for the run); returns (candidate names, report dir)."""
    root = tmp_path_factory.mktemp("api-files")
    names = [n for n in world["names"] if n != world["people"][0]]
    (root / "names.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    idia_engine.build_index(idia_engine.BuildConfig(names_file=root / "names.txt", index_dir=root / "idx",
                                                    model=tiny_spec, templates=TEMPLATES, index_kind="flat",
                                                    device="cpu"),
                            model=tiny_model)
    idia_engine.run_query(idia_engine.QueryConfig(index_dir=root / "idx", faces_dir=world["faces"],
                                                  out_dir=root / "report", device="cpu"), model=tiny_model)
    return names, root / "report"


def _world_photos(world) -> dict[str, list[Path]]:
    return {p: sorted((world["faces"] / p.replace(" ", "_")).iterdir()) for p in world["people"]}


def test_attack_in_memory_equals_build_index_plus_query(world, tiny_model, file_run):
    names, report = file_run
    result = idia_engine.attack(idia_engine.Model(tiny_model), names, _world_photos(world), templates=TEMPLATES)

    with open(report / "persons.csv", newline="", encoding="utf-8") as f:
        persons_csv = {row["name"]: row for row in csv.DictReader(f)}
    assert [p.name for p in result.persons] == list(persons_csv)
    for p in result.persons:
        row = persons_csv[p.name]
        assert (p.n_photos, p.score, p.decision) == (int(row["n_images"]), int(row["score"]),
                                                   row["decision"] == "member")
        assert p.in_candidates == (row["in_index"] == "yes")
    assert result.candidates_added_for_this_run == (world["people"][0],)

    predictions = idia_engine.load_predictions(report)
    assert list(result.candidates) == predictions.candidates
    assert [ph.source for ph in result.photos] == [row["path"] for row in predictions.images]
    assert [list(ph.top1) for ph in result.photos] == predictions.top1_names()
    ids = np.array([[[result.candidates.index(n) for n in names_t] for names_t in ph.top_names]
                    for ph in result.photos])
    assert np.array_equal(ids, predictions.topk_ids)
    # Same batches of prompts and photos, same index kind: the cosines agree bit for bit.
    assert np.array_equal(np.stack([ph.top_cosines for ph in result.photos]), predictions.topk_scores)

    modes = result.modes_frame()
    assert len(modes) == len(result.persons) * len(TEMPLATES) and modes["hit"].sum() == sum(p.score for p in result.persons)
    frame = result.to_pandas()
    assert list(frame["score"]) == [int(persons_csv[n]["score"]) for n in frame["name"]]
    assert len(result.predictions_frame()) == len(result.photos) * len(TEMPLATES) * 10


def test_pil_images_dense_index_and_a_wrapped_model_give_the_same_decisions(world, tiny_model, file_run):
    names, _ = file_run
    photos = _world_photos(world)
    reference = idia_engine.attack(idia_engine.Model(tiny_model), names, photos, templates=["a photo of {}"])
    in_memory = {p: [Image.open(f) for f in files] for p, files in photos.items()}
    wrapped = idia_engine.from_open_clip(tiny_model.model, tiny_model.preprocess, tiny_model.tokenizer)
    for other in (idia_engine.attack(tiny_model, names, in_memory, templates=["a photo of {0}"]),
                  idia_engine.attack(wrapped, names, photos, templates=["a photo of {0}"], index="dense")):
        assert [(p.name, p.score, p.templates) for p in other.persons] == \
            [(p.name, p.score, p.templates) for p in reference.persons]
        assert [ph.top1 for ph in other.photos] == [ph.top1 for ph in reference.photos]
    assert wrapped.info.weights_source == "in-memory" and wrapped.info.embed_dim == 64


def test_labels_give_metrics_and_undecodable_photos_are_skipped(world, tiny_model, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    people = world["people"][:2]
    photos = {people[0]: [Image.new("RGB", (40, 40), "red"), bad], people[1]: [Image.new("RGB", (40, 40), "blue")]}
    result = idia_engine.attack(tiny_model, world["names"], photos, templates=["{0}"], top_k=3,
                                labels={people[0]: True, people[1]: False, "Nobody Here": True})
    assert [s.path for s in result.skipped] == [str(bad)]
    assert result.person(people[0]).n_photos == 1
    m = result.metrics
    assert (m.persons, m.members, m.non_members, m.tau) == (2, 1, 1, 1)
    assert m.tpr == m.tp / 1 and m.fpr == m.fp / 1 and m.labels_for_unknown_names == ("Nobody Here",)
    assert list(result.to_pandas()["label"]) == [True, False]
    assert result.photos[0].top_cosines.shape == (1, 3)


def test_identity_is_what_the_model_sees(world, tiny_model):
    """As build-index and query decide it: names with the same token ids are one candidate, and a person
    spelt otherwise than a name with its tokens is that name, not a twin added for the run."""
    first, second = world["names"][:2]
    photo = [Image.new("RGB", (40, 40), "red")]
    result = idia_engine.attack(tiny_model, [first, second, "  " + first.replace(" ", "  ") + " "],
                                {first.replace(" ", "  "): photo, second.upper(): photo}, templates=["{0}"])
    assert result.candidates == (first, second) and result.candidates_added_for_this_run == ()
    assert all(p.in_candidates for p in result.persons)
    with pytest.raises(InputError, match="same token ids") as info:
        idia_engine.attack(tiny_model, [first], {first: photo, first.replace(" ", "   "): photo}, templates=["{0}"])
    assert "\n" not in str(info.value)


def test_the_same_photo_twice_votes_once(world, tiny_model, tmp_path):
    """As query counts them: the same bytes under two paths, or two equal PIL images, are one photo."""
    person = world["people"][0]
    original = sorted((world["faces"] / person.replace(" ", "_")).iterdir())[0]
    copy = tmp_path / "copy.png"
    copy.write_bytes(original.read_bytes())
    red = Image.new("RGB", (40, 40), "red")
    result = idia_engine.attack(tiny_model, world["names"], {person: [original, copy, red, red.copy()]},
                                templates=["{0}"])
    assert result.person(person).n_photos == 2
    assert [s.path for s in result.skipped] == [str(copy), "<image 3>"]
    assert all("one photo, one vote" in s.reason for s in result.skipped)


@pytest.mark.parametrize("kwargs, message", [
    ({"tau": 0}, "--tau must be >= 1"),
    ({"templates": ["no placeholder"]}, "no placeholder"),
    ({"index": "IVF4,Flat"}, "not an exact in-memory index"),
    ({"photos": {"Anna Smith": "a.png"}}, "wrap a single photo in a list"),
    ({"photos": {"Anna Smith": [], "anna smith": []}}, "name the same person"),
    ({"names": []}, "names is empty"),
    ({"labels": {"Anna Smith": "yes"}}, "must be True (member) or False"),
])
def test_bad_inputs_raise_one_line_input_errors(tiny_model, kwargs, message):
    args = {"names": ["Anna Smith"], "photos": {"Anna Smith": []}, **kwargs}
    with pytest.raises(InputError, match=re.escape(message)) as info:
        idia_engine.attack(tiny_model, args.pop("names"), args.pop("photos"), **args)
    assert "\n" not in str(info.value)


def test_importing_the_api_is_cheap_and_exports_every_entry_point():
    # Every `idia_engine.engine...` import runs idia_engine/__init__.py first: it must not pull in torch.
    code = "import sys, idia_engine; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
    import idia_engine.cli.app
    import idia_engine.engine.query.votes
    import idia_engine.indexes  # noqa: F401 - the installed layout (package-dir mappings) must give all three
    for name in idia_engine.__all__:
        assert getattr(idia_engine, name) is not None
    assert callable(idia_engine.attack) and issubclass(idia_engine.IdiaError, Exception)


def test_the_readme_example_runs_verbatim(tmp_path, monkeypatch, capsys):
    text = README.read_text(encoding="utf-8")
    assert text.count(README_MARKER) == 1
    block = re.match(r"\s*```python\n(.*?)\n```", text.split(README_MARKER, 1)[1], re.S)
    assert block is not None, "the marker must stand right before a ```python block"
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README.md (Python API)", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "Anna Smith" in out and "Liam Kim" in out and "cosine" in out
