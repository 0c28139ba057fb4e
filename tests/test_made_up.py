"""Made-up candidate names (`idia-engine names`): seeded, distinct, half per sex, from the top-K census lists.

A small pool is checked against a brute-force enumeration of every (first, last) pair; the census lists
come from the installed `names` package (no download).
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from idia_engine.cli.app import app
from idia_engine.engine.candidates import made_up as namegen
from idia_engine.engine.candidates.made_up import (
    NamesConfig,
    Sex,
    census_title,
    generate_names,
    load_census_lists,
    write_made_up_names,
)
from idia_engine.engine.candidates.names_file import read_names
from idia_engine.engine.errors import ArtifactExistsError, InputError
from typer.testing import CliRunner

runner = CliRunner()

# In the top 210 first names of both sexes exactly one is shared ("Leslie"): the smallest pool where the
# same full name can come from both sexes' lists.
SHARED_K = 210


@pytest.fixture(scope="module")
def lists():
    return load_census_lists()


def brute_force_pool(lists, k_first: int, k_last: int, exclude=()) -> dict[str, set[str]]:
    """Every name of the pool -> the sexes whose list can spell it, written plainly."""
    gone = {" ".join(n.split()).casefold() for n in exclude}
    pool: dict[str, set[str]] = {}
    for sex, firsts in (("male", lists.male[:k_first]), ("female", lists.female[:k_first])):
        for first in firsts:
            for last in lists.surnames[:k_last]:
                name = f"{first} {last}"
                if name.casefold() not in gone:
                    pool.setdefault(name, set()).add(sex)
    return pool


# --- the lists -------------------------------------------------------------------------------------

def test_census_lists_are_loaded_title_cased(lists):
    assert (len(lists.male), len(lists.female), len(lists.surnames)) == (1219, 4275, 88799)
    assert lists.male[:3] == ("James", "John", "Robert")
    assert lists.female[0] == "Mary" and lists.surnames[:2] == ("Smith", "Johnson")
    assert "McDonald" in lists.surnames[:1000]
    assert lists.source.startswith("names ")
    assert set(lists.male[:SHARED_K]) & set(lists.female[:SHARED_K]) == {"Leslie"}


@pytest.mark.parametrize("raw, expected", [
    ("SMITH", "Smith"), ("MCDONALD", "McDonald"), ("MC", "Mc"), ("MACK", "Mack"), ("OBRIEN", "Obrien"),
    ("O'BRIEN", "O'Brien"), ("SMITH-JONES", "Smith-Jones"), ("MCNEIL-O'HARA", "McNeil-O'Hara"),
])
def test_census_title(raw, expected):
    assert census_title(raw) == expected


# --- sampling --------------------------------------------------------------------------------------

def test_seeded_exact_count_distinct_half_per_sex():
    a = generate_names(1001, seed=42)
    assert a.names == generate_names(1001, seed=42).names
    assert a.sexes == generate_names(1001, seed=42).sexes
    b = generate_names(1001, seed=7)
    assert b.names != a.names and len(set(a.names) & set(b.names)) < 100  # 1,001 of 1.9 M each
    assert a.count == len(a.names) == len(a.sexes) == 1001
    assert len(set(a.names)) == 1001
    assert a.per_sex == {"female": 500, "male": 501}
    assert Counter(a.sexes) == {Sex.FEMALE: 500, Sex.MALE: 501}
    assert a.max_count == 2 * 1000 * 1000 - 79 * 1000  # 79 first names of the top 1,000 are in both lists


def test_names_come_from_the_top_k_lists_of_their_sex(lists):
    g = generate_names(1500, seed=1, first_names=50, surnames=20)
    top = {"male": set(lists.male[:50]), "female": set(lists.female[:50])}
    surnames = set(lists.surnames[:20])
    for name, sex in zip(g.names, g.sexes):
        first, last = name.split(" ")
        assert first in top[sex] and last in surnames, (name, sex)
    assert g.per_sex == {"female": 750, "male": 750}
    assert (g.male_first_names, g.female_first_names, g.surnames) == (50, 50, 20)


def test_output_order_mixes_the_sexes():
    sexes = generate_names(1000, seed=3).sexes
    assert Counter(sexes[:100])[Sex.FEMALE] not in (0, 100)


def test_exclusion_case_and_space_insensitive(tmp_path):
    first = generate_names(400, seed=5)
    real = first.names[:50]  # names this seed and count would draw, both sexes among them
    assert {first.sexes[i] for i in range(50)} == {Sex.FEMALE, Sex.MALE}
    exclude = tmp_path / "real.txt"
    spelled = [real[0].upper(), "  " + real[1].lower().replace(" ", "   ") + "  "] + real[2:]
    exclude.write_text("# real people\n" + "\n".join(spelled + ["Somebody Notinthelists", "Ann Van Der Berg"]) + "\n",
                       encoding="utf-8")
    g = write_made_up_names(NamesConfig(out=tmp_path / "names.txt", count=400, seed=5, exclude_file=exclude)).generated
    assert not set(g.names) & set(real)
    assert g.count == 400 and len(set(g.names)) == 400 and g.per_sex == {"female": 200, "male": 200}
    assert g.excluded == 50
    assert g.max_count == first.max_count - 50


def test_small_pool_matches_brute_force(lists):
    """Every name of a pool where one first name is in both lists: each once, split as evenly as possible."""
    exclude = ["Leslie Smith", "James Johnson", "Mary  WILLIAMS", "Nobody Smith"]
    pool = brute_force_pool(lists, SHARED_K, 3, exclude)
    full = 2 * SHARED_K * 3 - 3  # "Leslie Smith/Johnson/Williams" can come from either list
    assert len(pool) == full - 3
    g = generate_names(len(pool), seed=0, exclude=exclude, first_names=SHARED_K, surnames=3)
    assert g.max_count == len(pool)
    assert sorted(g.names) == sorted(pool)
    assert g.per_sex == {"female": len(pool) // 2, "male": len(pool) - len(pool) // 2}
    for name, sex in zip(g.names, g.sexes):
        assert sex.value in pool[name]
    with pytest.raises(InputError, match=f"exceeds the {len(pool):,} distinct"):
        generate_names(len(pool) + 1, seed=0, exclude=exclude, first_names=SHARED_K, surnames=3)


def test_a_short_sex_is_made_up_by_the_other(lists):
    # Exclude every female name but ten: the male side supplies the rest.
    female = [f"{f} {s}" for f in lists.female[:5] for s in lists.surnames[:4]][10:]
    g = generate_names(30, seed=2, exclude=female, first_names=5, surnames=4)
    assert g.per_sex == {"female": 10, "male": 20}
    assert not set(g.names) & set(female)


def test_count_beyond_the_pool_names_the_maximum_and_the_option():
    with pytest.raises(InputError) as e:
        generate_names(2_000_000)
    msg = str(e.value)
    assert "1,921,000" in msg and "--surnames (at most 88,799)" in msg and "--first-names" in msg
    with pytest.raises(InputError, match="every name of the census lists"):
        generate_names(10**9, first_names=10**6, surnames=10**6)


@pytest.mark.parametrize("kwargs, option", [
    ({"count": 0}, "--count"), ({"count": -3}, "--count"), ({"count": 5, "first_names": 0}, "--first-names"),
    ({"count": 5, "surnames": 0}, "--surnames"), ({"count": 5, "seed": -1}, "--seed"),
])
def test_bad_values(kwargs, option):
    with pytest.raises(InputError, match=option):
        generate_names(**kwargs)


def test_memory_light_sampler_draws_distinct_uniform_values(monkeypatch):
    monkeypatch.setattr(namegen, "_ARANGE_LIMIT", 1000)  # take the draw-and-dedupe branch on a small population
    rng = np.random.default_rng(0)
    population, size, rounds = 10_000, 1_000, 300
    counts = np.zeros(population)
    firsts = np.zeros(10)
    for _ in range(rounds):
        x = namegen._sample_distinct(rng, population, size)
        assert len(x) == size and len(np.unique(x)) == size and x.min() >= 0 and x.max() < population
        counts[x] += 1
        firsts[x[0] * 10 // population] += 1
    # each value is drawn in 10 % of rounds (expected 30, sd ~5.2); each decile leads in 10 % of rounds
    assert abs(counts.mean() - 30) < 1e-9 and counts.std() < 7.5
    assert firsts.min() > 10


def test_a_million_names_in_seconds():
    start = time.perf_counter()
    g = generate_names(10**6, seed=42)
    seconds = time.perf_counter() - start
    assert g.count == 10**6 and len(set(g.names)) == 10**6
    assert g.per_sex == {"female": 500_000, "male": 500_000}
    assert seconds < 20, f"10^6 names took {seconds:.1f} s"


# --- the file and the command ----------------------------------------------------------------------

def test_write_refuses_to_overwrite(tmp_path):
    out = tmp_path / "names.txt"
    out.write_text("keep me\n", encoding="utf-8")
    with pytest.raises(ArtifactExistsError, match="--overwrite"):
        write_made_up_names(NamesConfig(out=out, count=5))
    assert out.read_text(encoding="utf-8") == "keep me\n"
    write_made_up_names(NamesConfig(out=out, count=5, overwrite=True))
    assert len(read_names(out).names) == 5
    with pytest.raises(InputError, match="directory"):
        write_made_up_names(NamesConfig(out=tmp_path, count=5, overwrite=True))


def test_cli_writes_the_file(tmp_path):
    out = tmp_path / "sub" / "names.txt"
    result = runner.invoke(app, ["names", "--count", "101", "--seed", "9", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "101 made-up names (50 female, 51 male)" in result.output and str(out.name) in result.output
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# made-up names: idia-engine names --count 101 --seed 9 --first-names 1000 --surnames 1000"
    assert lines[1].startswith("# source: names ")
    assert read_names(out).names == generate_names(101, seed=9).names == lines[2:]


def test_cli_exclude_and_options(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("\n".join(generate_names(20, seed=1, first_names=3, surnames=4).names[:6]) + "\n", encoding="utf-8")
    out = tmp_path / "names.txt"
    result = runner.invoke(app, ["names", "-n", "15", "--seed", "1", "--first-names", "3", "--surnames", "4",
                                 "--exclude", str(real), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"6 name(s) of {real} were in the pool and are left out" in result.output
    names = read_names(out).names
    assert len(names) == 15 and not set(names) & set(read_names(real).names)


def test_cli_usage_errors_exit_2(tmp_path):
    out = tmp_path / "names.txt"
    assert runner.invoke(app, ["names", "-n", "3", "-o", str(out)]).exit_code == 0
    before = out.read_text(encoding="utf-8")
    refused = runner.invoke(app, ["names", "-n", "4", "-o", str(out)])
    assert refused.exit_code == 2 and "--overwrite" in refused.output and "Traceback" not in refused.output
    assert out.read_text(encoding="utf-8") == before
    assert runner.invoke(app, ["names", "-n", "4", "-o", str(out), "--overwrite"]).exit_code == 0
    for bad in (["-n", "0"], ["-n", "-5"], ["-n", "lots"], ["-n", "3000000"], ["-n", "3", "--surnames", "0"]):
        r = runner.invoke(app, ["names", *bad, "-o", str(tmp_path / "other.txt")])
        assert r.exit_code == 2, (bad, r.output)
    missing = runner.invoke(app, ["names", "-n", "3", "--exclude", str(tmp_path / "nope.txt"),
                                  "-o", str(tmp_path / "other.txt")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    assert not (tmp_path / "other.txt").exists()
