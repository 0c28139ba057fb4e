"""Made-up candidate names: "First Last" drawn from real US census name lists (the paper's point 7).

The paper pads its candidate set with made-up names sampled with seed 42 from the top-1,000 US first
names per sex x the top-1,000 US surnames, half per sex. This module does the same at any scale.

Data: the census lists shipped as data files by the PyPI package `names` (0.3.0: `dist.male.first`,
1,219 names; `dist.female.first`, 4,275 names; `dist.all.last`, 88,799 surnames; one "NAME freq cumfreq
rank" line each, upper case, ordered by frequency). These are the 1990 census lists; the paper's
surnames come from the 2010 census, so the top-1,000 surnames differ slightly.

Spelling: the lists are upper-case A-Z only (no apostrophes, "OBRIEN"), so each word is capitalised
("SMITH" -> "Smith", "OBRIEN" -> "Obrien"), with one rule on top: a word starting with "MC" keeps a
capital after it ("MCDONALD" -> "McDonald"), which is unambiguous, unlike "MAC" ("MACK") or "O"
("OLSON"). Apostrophes and hyphens, should a list hold them, start a new capital ("O'Brien").

Sampling, for a count N:
- the pool of each sex is the grid (top-K first names of that sex) x (top-K surnames); a full name is
  uniform over the grid of its sex and drawn without replacement; N // 2 names are female, the rest male;
- a first name in both sexes' lists (79 of the top 1,000) makes the same full name possible in both
  grids: the female draw skips names the male draw took, so every name appears once;
- excluded names (real people) are never drawn; they are compared on the normalised name with runs of
  whitespace collapsed, case-insensitively (str.casefold), so "mary  SMITH" excludes "Mary Smith";
- when one sex cannot supply its half (near the pool's size, many exclusions), names in both lists are
  labelled with the short sex and the other sex makes up the rest: the split is the closest to half that
  the pool allows, and exactly N names come out whenever N distinct names exist (else InputError names
  the maximum);
- output order: the seeded shuffle of all N names (sexes interleaved at random). The result is a
  function of (N, seed, list sizes, exclusion set, numpy version); a smaller N is not a prefix of a
  larger one.
"""

from __future__ import annotations

import logging
import re
import shlex
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from importlib import metadata, resources
from pathlib import Path

import numpy as np

from ..disk.atomic import write_text_atomic
from ..errors import ArtifactExistsError, InputError, NameDataError
from .names_file import normalize_name, read_names

log = logging.getLogger(__name__)

DATA_PACKAGE = "names"  # the PyPI package whose data files are the census lists
DEFAULT_SEED = 42  # the paper's seed
DEFAULT_FIRST_NAMES = 1000  # top-K first names per sex (the paper's K)
DEFAULT_SURNAMES = 1000  # top-K surnames (the paper's K)

# Beyond this population, numpy's choice(replace=False) materialises arange(population) once the sample
# exceeds 1/50 of it; _sample_distinct switches to a memory-light draw there (see its docstring).
_ARANGE_LIMIT = 1 << 24


class Sex(str, Enum):
    """The sex of a census first-name list; the value is what GeneratedNames.sexes holds."""

    FEMALE = "female"
    MALE = "male"


_LIST_FILES = {Sex.MALE: "dist.male.first", Sex.FEMALE: "dist.female.first", "surnames": "dist.all.last"}


@dataclass(frozen=True)
class CensusLists:
    """The census lists, title-cased, most frequent first, without duplicates."""

    male: tuple[str, ...]  # male first names
    female: tuple[str, ...]  # female first names
    surnames: tuple[str, ...]  # surnames of all sexes
    source: str  # e.g. "names 0.3.0" (the distribution the data files come from)


@dataclass(frozen=True)
class GeneratedNames:
    """Made-up names and the sex of the first-name list each one was drawn from."""

    names: list[str]  # "First Last", distinct, in the seeded output order
    sexes: list[Sex]  # sexes[i] is the sex of names[i] (Sex is a str: "female" / "male")
    seed: int  # the seed of the draw
    male_first_names: int  # male first names in the pool
    female_first_names: int  # female first names in the pool
    surnames: int  # surnames in the pool
    excluded: int  # distinct given names that were in the pool and therefore never drawn
    max_count: int  # distinct names the pool holds after exclusion (the largest count possible)
    source: str  # where the lists come from, e.g. "names 0.3.0 (US census lists)"

    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def per_sex(self) -> dict[str, int]:
        """{"female": n, "male": n}."""
        n_female = sum(1 for s in self.sexes if s is Sex.FEMALE)
        return {Sex.FEMALE.value: n_female, Sex.MALE.value: len(self.sexes) - n_female}


@dataclass(frozen=True)
class NamesConfig:
    """Everything `write_made_up_names` needs."""

    out: Path  # the names file to write (UTF-8, '#' header, one name per line)
    count: int  # how many names (>= 1)
    seed: int = DEFAULT_SEED  # seed of the draw
    exclude_file: Path | None = None  # names file of real names never to generate
    first_names: int = DEFAULT_FIRST_NAMES  # top-K first names per sex
    surnames: int = DEFAULT_SURNAMES  # top-K surnames
    overwrite: bool = False  # replace an existing `out`


@dataclass(frozen=True)
class NamesFileResult:
    """What `write_made_up_names` wrote."""

    path: Path
    generated: GeneratedNames
    seconds: float  # generation and writing, wall clock


# --- the census lists ------------------------------------------------------------------------------

def _title_word(word: str) -> str:
    return "Mc" + word[2:].capitalize() if word.startswith("mc") and len(word) > 2 else word.capitalize()


def census_title(raw: str) -> str:
    """Spell an upper-case census entry as a name: 'SMITH' -> 'Smith', 'MCDONALD' -> 'McDonald'."""
    low = raw.lower()
    if low.isalpha():  # every entry of the shipped lists
        return _title_word(low)
    return "".join(_title_word(part) for part in re.split(r"([-' ])", low))


def _read_list(path, what: str) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise NameDataError(f"cannot read the census {what} list {path} of package {DATA_PACKAGE!r}: {e}; "
                            f"reinstall it (pip install --force-reinstall {DATA_PACKAGE})") from None
    seen: set[str] = set()
    out: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 4:
            raise NameDataError(f"{path}:{lineno}: expected 'NAME freq cumfreq rank', got {line!r}")
        name = census_title(fields[0])
        if name.casefold() not in seen:  # keep the more frequent spelling of a repeated entry
            seen.add(name.casefold())
            out.append(name)
    if not out:
        raise NameDataError(f"census {what} list {path} is empty; reinstall {DATA_PACKAGE!r}")
    return tuple(out)


@lru_cache(maxsize=1)
def load_census_lists() -> CensusLists:
    """The census lists of the installed `names` package (read once per process).

    Raises NameDataError when the package or its data files are missing.
    """
    try:
        folder = resources.files(DATA_PACKAGE)
    except ModuleNotFoundError:
        raise NameDataError(f"the census name lists come from the PyPI package {DATA_PACKAGE!r}, which is not "
                            f"installed; pip install {DATA_PACKAGE}") from None
    lists = {key: _read_list(folder / fname, fname) for key, fname in _LIST_FILES.items()}
    try:
        version = metadata.version(DATA_PACKAGE)
    except metadata.PackageNotFoundError:
        version = "unknown version"
    return CensusLists(male=lists[Sex.MALE], female=lists[Sex.FEMALE], surnames=lists["surnames"],
                       source=f"{DATA_PACKAGE} {version}")


# --- sampling --------------------------------------------------------------------------------------

# numpy 2.x's np.unique (and union1d) is hash-based and, measured on 10^6 int64, about 100x slower than
# np.sort; np.isin is slower than a binary search. These two do the same through sort and searchsorted.

def _unique(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values of an int64 array."""
    ranked = np.sort(values)
    return ranked[np.concatenate(([True], ranked[1:] != ranked[:-1]))] if len(ranked) else ranked


def _in_sorted(values: np.ndarray, ranked: np.ndarray) -> np.ndarray:
    """Boolean mask: which of `values` are in `ranked` (sorted, unique)."""
    if not len(ranked):
        return np.zeros(len(values), dtype=bool)
    pos = np.minimum(np.searchsorted(ranked, values), len(ranked) - 1)
    return ranked[pos] == values


def _sample_distinct(rng: np.random.Generator, population: int, size: int) -> np.ndarray:
    """`size` distinct int64 values from range(population), in uniformly random order.

    numpy's choice(replace=False) is fast throughout but builds arange(population) (8 bytes each) once
    `size` exceeds population / 50; for a large population and a moderate sample this draws with
    replacement instead and keeps first occurrences: the sequence of first occurrences of i.i.d. uniform
    draws is a uniformly random ordered sample without replacement. Memory O(size).
    """
    if size <= 0:
        return np.empty(0, np.int64)
    if population <= _ARANGE_LIMIT or size * 50 <= population or size * 2 >= population:
        return rng.choice(population, size=size, replace=False).astype(np.int64, copy=False)
    out = np.empty(0, np.int64)
    while len(out) < size:
        need = size - len(out)
        drawn = np.concatenate([out, rng.integers(0, population, size=need + need // 4 + 64, dtype=np.int64)])
        order = np.argsort(drawn, kind="stable")  # equal values keep draw order: the first comes first
        ranked = drawn[order]
        first = order[np.concatenate(([True], ranked[1:] != ranked[:-1]))]
        out = drawn[np.sort(first)]
    return out[:size]


def _draw(rng: np.random.Generator, grid: int, size: int, forbidden: np.ndarray) -> np.ndarray:
    """`size` distinct cells of range(grid) not in `forbidden` (sorted, unique), uniformly at random.

    Drawing size + len(forbidden) distinct cells leaves at least `size` allowed ones; keeping the first
    allowed cells in draw order is a uniform sample of the allowed cells.
    """
    if size <= 0:
        return np.empty(0, np.int64)
    cells = _sample_distinct(rng, grid, min(grid, size + len(forbidden)))
    if len(forbidden):
        cells = cells[~_in_sorted(cells, forbidden)]
    if len(cells) < size:  # the callers size their requests from exact pool counts
        raise AssertionError(f"internal: drew {len(cells)} allowed cells of {grid}, needed {size}")
    return cells[:size]


def _cross(cells: np.ndarray, other_first: np.ndarray, n_surnames: int) -> np.ndarray:
    """The cells of the other sex's grid spelling the same full names as `cells` (where one exists)."""
    first, last = np.divmod(cells, n_surnames)
    other = other_first[first]
    has = other >= 0
    return other[has] * n_surnames + last[has]


def _excluded_cells(exclude: Iterable[str], male: tuple[str, ...], female: tuple[str, ...],
                    surnames: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The male and female grid cells (sorted, unique int64) that spell one of the names to exclude.

    Comparison key: the normalised name, case-folded, split on runs of whitespace. Census entries hold no
    space, so only two-word names can be in the pool.
    """
    if isinstance(exclude, str):
        raise TypeError("exclude must be an iterable of names, not one string")
    m_index = {n.casefold(): i for i, n in enumerate(male)}
    f_index = {n.casefold(): i for i, n in enumerate(female)}
    s_index = {n.casefold(): i for i, n in enumerate(surnames)}
    # Flat strings, no per-name list or tuple: 10^6 live containers would set off the cyclic garbage
    # collector again and again (6x slower). NFC leaves ASCII unchanged, so ASCII names skip it.
    keys = [" ".join((name if name.isascii() else normalize_name(name)).casefold().split()) for name in exclude]
    keys = [k for k in keys if k.count(" ") == 1]
    s = np.fromiter((s_index.get(k.partition(" ")[2], -1) for k in keys), np.int64, count=len(keys))
    cells = []
    for index in (m_index, f_index):
        first = np.fromiter((index.get(k.partition(" ")[0], -1) for k in keys), np.int64, count=len(keys))
        hit = (first >= 0) & (s >= 0)
        cells.append(_unique(first[hit] * len(surnames) + s[hit]))
    return cells[0], cells[1]


def _check_positive(option: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{option} must be an integer >= 1, got {value!r}")


def generate_names(count: int, seed: int = DEFAULT_SEED, exclude: Iterable[str] = (),
                   first_names: int = DEFAULT_FIRST_NAMES, surnames: int = DEFAULT_SURNAMES) -> GeneratedNames:
    """`count` distinct made-up "First Last" names, about half per sex, none of them in `exclude`.

    first_names / surnames: K of the top-K lists (clipped to the lists' lengths: 1,219 male and 4,275
    female first names, 88,799 surnames). exclude: full names compared case-insensitively (module
    docstring). Raises InputError for count, K or seed out of range and when `count` exceeds the distinct
    names of the pool (the message gives the maximum and the option that raises it). 10^6 names take
    1-2 s on one CPU core.
    """
    _check_positive("--count", count)
    _check_positive("--first-names", first_names)
    _check_positive("--surnames", surnames)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"--seed must be an integer >= 0, got {seed!r}")
    lists = load_census_lists()
    male, female, last = lists.male[:first_names], lists.female[:first_names], lists.surnames[:surnames]
    if first_names > len(male) or surnames > len(last):
        log.info("pool clipped to the census lists: %d male and %d female first names, %d surnames",
                 len(male), len(female), len(last))
    n_s = len(last)
    grid_m, grid_f = len(male) * n_s, len(female) * n_s

    # first-name index of the other sex's list spelling the same first name, or -1
    f_pos = {n: i for i, n in enumerate(female)}
    m_pos = {n: i for i, n in enumerate(male)}
    m2f = np.array([f_pos.get(n, -1) for n in male], dtype=np.int64)
    f2m = np.array([m_pos.get(n, -1) for n in female], dtype=np.int64)

    ex_m, ex_f = _excluded_cells(exclude, male, female, last)
    avail_m, avail_f = grid_m - len(ex_m), grid_f - len(ex_f)
    # Names in both grids count once. An excluded one is excluded from both grids alike.
    shared_excluded = int((m2f[ex_m // n_s] >= 0).sum())
    shared = int((m2f >= 0).sum()) * n_s - shared_excluded
    excluded = len(ex_m) + len(ex_f) - shared_excluded
    max_count = avail_m + avail_f - shared
    if count > max_count:
        grow = []
        if len(last) < len(lists.surnames):
            grow.append(f"--surnames (at most {len(lists.surnames):,})")
        if len(male) < len(lists.male) or len(female) < len(lists.female):
            grow.append(f"--first-names (at most {max(len(lists.male), len(lists.female)):,})")
        hint = (f"; raise {' or '.join(grow)}" if grow else
                "; this is every name of the census lists: lower --count or exclude fewer names")
        raise InputError(
            f"--count {count:,} exceeds the {max_count:,} distinct made-up names possible from "
            f"{len(male):,} male and {len(female):,} female first names x {n_s:,} surnames "
            f"({excluded:,} excluded name(s) removed){hint}")

    rng = np.random.default_rng(seed)
    want_f = min(count // 2, avail_f)
    want_m = min(count - want_f, avail_m)
    want_f = count - want_m
    male_cells = _draw(rng, grid_m, want_m, ex_m)
    forbid_f = _unique(np.concatenate([ex_f, _cross(male_cells, m2f, n_s)]))
    got_f = min(want_f, grid_f - len(forbid_f))
    female_cells = _draw(rng, grid_f, got_f, forbid_f)
    if got_f < want_f:
        # Every female name is drawn or was taken by the male draw (a first name in both lists). Names in
        # both lists may carry either sex: relabel enough of the male draw's as female, and let the male
        # side draw the rest from its own names.
        shared_picks = np.flatnonzero(m2f[male_cells // n_s] >= 0)[:want_f - got_f]
        taken_m = np.concatenate([ex_m, male_cells])
        female_cells = np.concatenate([female_cells, _cross(male_cells[shared_picks], m2f, n_s)])
        male_cells = np.delete(male_cells, shared_picks)
        forbid_m = _unique(np.concatenate([taken_m, _cross(female_cells, f2m, n_s)]))
        extra = count - len(female_cells) - len(male_cells)
        male_cells = np.concatenate([male_cells, _draw(rng, grid_m, extra, forbid_m)])
        log.info("the female pool ran short: %d shared names relabelled female, %d more male names drawn",
                 len(shared_picks), extra)

    # One table of first names, male then female: a cell of it fixes both the name and the sex.
    firsts = male + female
    cells = np.concatenate([male_cells, female_cells + grid_m])[rng.permutation(count)]
    names_out = [f"{firsts[c // n_s]} {last[c % n_s]}" for c in cells.tolist()]
    sexes_out = [Sex.MALE if is_male else Sex.FEMALE for is_male in (cells < grid_m).tolist()]
    return GeneratedNames(names=names_out, sexes=sexes_out, seed=int(seed), male_first_names=len(male),
                          female_first_names=len(female), surnames=n_s, excluded=excluded, max_count=max_count,
                          source=f"{lists.source} (US census lists)")


# --- the names file --------------------------------------------------------------------------------

def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise InputError(f"--out {out} is a directory; give a file path such as {out / 'names.txt'}")
    if out.exists() and not overwrite:
        raise ArtifactExistsError(f"{out} already exists; pass --overwrite to replace it")


def write_made_up_names(config: NamesConfig) -> NamesFileResult:
    """Generate `config.count` names and write them to `config.out` atomically.

    The file: two '#' comment lines (the command that reproduces it, the data source and per-sex counts;
    read_names skips them), then one name per line, UTF-8. An existing file is an ArtifactExistsError
    unless config.overwrite; that is checked before any work is done.
    """
    start = time.perf_counter()
    out = Path(config.out)
    _check_out(out, config.overwrite)
    exclude: list[str] = []
    if config.exclude_file is not None:
        exclude = read_names(Path(config.exclude_file)).names
    generated = generate_names(config.count, seed=config.seed, exclude=exclude,
                               first_names=config.first_names, surnames=config.surnames)
    command = (f"idia-engine names --count {config.count} --seed {config.seed} "
               f"--first-names {config.first_names} --surnames {config.surnames}")
    if config.exclude_file is not None:
        command += f" --exclude {shlex.quote(str(config.exclude_file))}"
    per_sex = generated.per_sex
    header = (f"# made-up names: {command}\n"
              f"# source: {generated.source}; {generated.male_first_names} male and "
              f"{generated.female_first_names} female first names x {generated.surnames} surnames; "
              f"{per_sex['female']} female, {per_sex['male']} male; {generated.excluded} pool name(s) excluded\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_out(out, config.overwrite)  # again: generation may take a moment
    write_text_atomic(out, header + "\n".join(generated.names) + "\n")
    seconds = time.perf_counter() - start
    log.info("wrote %d made-up names to %s in %.2f s", generated.count, out, seconds)
    return NamesFileResult(path=out, generated=generated, seconds=seconds)
