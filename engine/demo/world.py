"""A synthetic world in which a CLIP model can really learn some people and not others.

The demo and the tests need a model that *knows* some identities, offline, in seconds. This module
makes the world; `engine/training.py` trains a tiny open_clip model on it.

The world:
- **identities**: made-up "First Last" names drawn from the US census name lists (`engine/candidates/made_up.py`),
  each with a face-like look that stays (skin and hair colour, hair style, face shape, eye spacing and
  colour, glasses or not) and photos that vary around it (pose, scale, position, light, colour cast,
  background, blur, sensor noise): `engine/demo/faces.py` renders them;
- **members and non-members**: members appear in the training data, each with a number of
  *occurrences* (distinct training photos with a caption that names them), drawn from levels like the
  paper's CC3M experiment (1, 5, 10, 25, 50, 75); non-members never appear;
- **hard non-members**: a share of the non-members are *look-alikes* of one member (the member's
  traits but for one minor one: eye colour, eye spacing, glasses or usual background) and a share are
  *namesakes* of one member (the member's first or last name, their own other name and their own
  face). Without them every non-member scores 0 and no threshold shows a false positive; with them the
  attack meets the two mistakes a real one meets: a face the model knows under another name, and a
  name part the model learned from someone else;
- **captions**: the member's name in varied caption templates (some of the attack's 21 templates, some
  news-style captions the attack never uses), plus captions without a person ("a red square on a blue
  background") paired with pictures of shapes, as caption noise;
- **held-out photos**: every identity, member or not, gets `heldout_photos` photos that are never
  trained on. The attack only ever sees these.

Everything is a pure function of the seed: the same config gives the same names, photos, captions and
membership, byte for byte.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import InputError
from .faces import FaceTraits, identity_traits, lookalike_traits, render_face

log = logging.getLogger(__name__)

# Captions used in training. Some are among the attack's 21 templates, the others are not: a real
# model sees its people in captions that nobody writes as attack prompts.
TRAINING_CAPTIONS = (
    "{0}",
    "a photo of {0}",
    "{0} at a gala",
    "a photo of the celebrity {0}",
    "{0} in a suit",
    "{0} attends the premiere",
    "portrait of {0}",
    "{0} speaks to reporters",
    "{0} poses for a picture",
    "a close-up of {0}",
    "{0} smiles at the camera",
    "{0} at the award ceremony",
)

_SHAPES = ("circle", "square", "triangle", "star", "stripe pattern", "checkerboard")
_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
            "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (15, 15, 15)}


@dataclass(frozen=True)
class WorldConfig:
    """How big the world is. The defaults are the demo's; the tests use a smaller one."""

    identities: int = 200  # people with photos: members and non-members
    member_fraction: float = 0.5
    occurrence_levels: tuple[int, ...] = (1, 5, 10, 25, 50, 75)  # training photos per member
    heldout_photos: int = 32  # per identity, never trained on (the attack uses these)
    noise_pairs: int = 1000  # image-caption pairs without a person
    image_size: int = 48  # rendered photo size in pixels (the model resizes to its own input size)
    lookalike_fraction: float = 0.25  # share of the non-members who look like one member (one minor trait differs)
    namesake_fraction: float = 0.25  # share of the non-members who share a first or last name with one member
    seed: int = 0


class HardKind(str, Enum):
    """Why a non-member is hard to tell from a member (the labels file's `hard_kind` column)."""

    NONE = ""  # a member, or a non-member unlike every member
    LOOKALIKE = "lookalike"  # a member's face but for one minor trait, under another name
    NAMESAKE = "namesake"  # a member's first or last name, with a face of their own


@dataclass(frozen=True)
class Identity:
    name: str  # "First Last"
    sex: str  # "female" / "male", as the census list gives it
    member: bool  # named in training captions
    occurrences: int  # training photos that name this person (0 for non-members)
    hard_kind: HardKind = HardKind.NONE  # for a non-member: look-alike or namesake of a member, or neither
    hard_of: int | None = None  # index (into World.identities) of the member they resemble or share a name with


@dataclass(frozen=True)
class TrainingPair:
    """One training example: how to render the image, and its caption."""

    caption: str
    identity: int | None  # index into World.identities; None for a no-person (shape) picture
    photo_seed: tuple[int, ...]  # seeds the photo's variation (and the shape picture)


@dataclass(frozen=True)
class World:
    config: WorldConfig  # what the world was made from
    identities: list[Identity]  # everyone, members and non-members
    training_pairs: list[TrainingPair] = field(repr=False)  # the training data: members' photos and shape noise
    traits: list[FaceTraits] = field(repr=False, default_factory=list)  # identities[i]'s look is traits[i]

    @property
    def members(self) -> list[Identity]:
        return [p for p in self.identities if p.member]

    def hard_non_members(self, kind: HardKind) -> list[Identity]:
        return [p for p in self.identities if p.hard_kind is kind]

    def render_training_image(self, pair: TrainingPair) -> Image.Image:
        size = self.config.image_size
        if pair.identity is None:
            return render_shape_picture(pair.caption, np.random.default_rng(pair.photo_seed), size)
        return render_face(self.traits[pair.identity], np.random.default_rng(pair.photo_seed), size)

    def render_heldout_photo(self, identity: int, j: int) -> Image.Image:
        """Photo j of an identity; stream 3 of the seed, so it never equals a training photo."""
        return render_face(self.traits[identity], np.random.default_rng([self.config.seed, 3, identity, j]),
                           self.config.image_size)


def make_world(config: WorldConfig = WorldConfig(), candidate_names: list[str] | None = None,
               sexes: list[str] | None = None) -> World:
    """Draw identities, membership, occurrences and the training captions for `config.seed`.

    Names come from `engine.candidates.made_up.generate_names` unless given (with their sexes). A
    namesake's name is made from the given ones (a member's name part and one of their own), so the
    world's names are not all among `candidate_names`: use `World.identities` for the names.
    """
    check_world_config(config)
    if candidate_names is None:
        from ..candidates.made_up import generate_names

        generated = generate_names(config.identities, seed=config.seed)
        candidate_names, sexes = generated.names, generated.sexes
    if len(candidate_names) < config.identities:
        raise ValueError(f"need {config.identities} names, got {len(candidate_names)}")
    sexes = sexes or ["unknown"] * len(candidate_names)

    rng = np.random.default_rng([config.seed, 0])
    n_members = round(config.identities * config.member_fraction)
    member_ids = set(rng.permutation(config.identities)[:n_members].tolist())
    # Occurrence levels are dealt round-robin over the shuffled members, so every level gets
    # (nearly) the same number of people.
    shuffled_members = rng.permutation(sorted(member_ids))
    occurrences = {int(p): config.occurrence_levels[i % len(config.occurrence_levels)]
                   for i, p in enumerate(shuffled_members)}
    identities = [Identity(candidate_names[i], sexes[i], i in member_ids, occurrences.get(i, 0))
                  for i in range(config.identities)]
    traits = [identity_traits(np.random.default_rng([config.seed, 1, i])) for i in range(config.identities)]
    _make_hard_non_members(config, identities, traits)

    pairs: list[TrainingPair] = []
    for i, person in enumerate(identities):
        for j in range(person.occurrences):
            template = TRAINING_CAPTIONS[int(rng.integers(len(TRAINING_CAPTIONS)))]
            pairs.append(TrainingPair(template.format(person.name), i, (config.seed, 2, i, j)))
    for j in range(config.noise_pairs):
        pair_rng = np.random.default_rng([config.seed, 4, j])
        pairs.append(TrainingPair(shape_caption(pair_rng), None, (config.seed, 5, j)))
    return World(config, identities, pairs, traits)


def _make_hard_non_members(config: WorldConfig, identities: list[Identity], traits: list[FaceTraits]) -> None:
    """Turn shares of the non-members into look-alikes and namesakes of members, in place.

    Its own random stream (6), so membership, occurrences and captions are those of a world without them.
    A look-alike keeps their name and takes a member's traits with one minor trait changed; a namesake
    keeps their face and takes a member's first name (and sex) or last name. Each picks a different member.
    """
    rng = np.random.default_rng([config.seed, 6])
    members = [i for i, p in enumerate(identities) if p.member]
    non_members = rng.permutation([i for i, p in enumerate(identities) if not p.member]).tolist()
    n_lookalikes = round(len(non_members) * config.lookalike_fraction)
    n_namesakes = round(len(non_members) * config.namesake_fraction)
    lookalikes, namesakes = non_members[:n_lookalikes], non_members[n_lookalikes:n_lookalikes + n_namesakes]

    for i, of in zip(lookalikes, _pick_members(rng, members, len(lookalikes))):
        traits[i], _ = lookalike_traits(traits[of], np.random.default_rng([config.seed, 7, i]))
        identities[i] = Identity(identities[i].name, identities[i].sex, False, 0, HardKind.LOOKALIKE, of)

    taken = {p.name.casefold() for p in identities}
    for i in namesakes:
        own_first, own_last = identities[i].name.split(" ", 1)
        # The first member whose name part makes a name nobody in the world has yet.
        for of in _pick_members(rng, members, len(members)):
            first, last = identities[of].name.split(" ", 1)
            share_first = bool(rng.random() < 0.5)
            options = [(f"{first} {own_last}", identities[of].sex), (f"{own_first} {last}", identities[i].sex)]
            if not share_first:
                options.reverse()
            fresh = [(name, sex) for name, sex in options if name.casefold() not in taken]
            if fresh:
                name, sex = fresh[0]
                taken.add(name.casefold())
                identities[i] = Identity(name, sex, False, 0, HardKind.NAMESAKE, of)
                break
        else:
            log.warning("no member's name part gives %s a new name: they stay an ordinary non-member",
                        identities[i].name)


def _pick_members(rng: np.random.Generator, members: list[int], count: int) -> list[int]:
    """`count` members, each at most once while there are enough of them."""
    picks: list[int] = []
    while len(picks) < count:
        picks.extend(rng.permutation(members)[:count - len(picks)].tolist())
    return picks


def check_world_config(config: WorldConfig) -> None:
    """InputError (one line) for a world that cannot be made; the demo calls it before it touches any file."""
    if config.identities < 2:
        raise InputError(f"a world needs at least 2 identities, got {config.identities}")
    if not 0 < config.member_fraction < 1:
        raise InputError(f"member_fraction must be in (0, 1), got {config.member_fraction}")
    if not config.occurrence_levels or min(config.occurrence_levels) < 1:
        raise InputError(f"occurrence levels must be >= 1, got {config.occurrence_levels}")
    if config.heldout_photos < 1:
        raise InputError(f"heldout_photos must be >= 1, got {config.heldout_photos}")
    fractions = (config.lookalike_fraction, config.namesake_fraction)
    if min(fractions) < 0 or sum(fractions) > 1:
        raise InputError(f"lookalike_fraction and namesake_fraction must be >= 0 and add up to at most 1, "
                         f"got {config.lookalike_fraction} and {config.namesake_fraction}")


def shape_caption(rng: np.random.Generator) -> str:
    """A caption without a person, e.g. "a red star on a blue background"."""
    colours = list(_COLOURS)
    fg, bg = rng.choice(len(colours), size=2, replace=False)
    return f"a {colours[fg]} {_SHAPES[int(rng.integers(len(_SHAPES)))]} on a {colours[bg]} background"


def render_shape_picture(caption: str, rng: np.random.Generator, size: int) -> Image.Image:
    """The picture a shape caption describes, with some jitter (it is noise for the attack)."""
    words = caption.split()
    fg, bg = _COLOURS[words[1]], _COLOURS[words[-2]]
    shape = " ".join(words[2:-4])
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.2, 0.4)
    cx, cy = size / 2 + rng.uniform(-0.15, 0.15, size=2) * size
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif shape == "star":
        angles = np.linspace(0, 2 * np.pi, 11)[:-1] - np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        d.polygon([(cx + q * np.cos(a), cy + q * np.sin(a)) for a, q in zip(angles, radii)], fill=fg)
    elif shape == "stripe pattern":
        step = max(2, int(size / rng.integers(4, 8)))
        for x in range(0, size, 2 * step):
            d.rectangle([x, 0, x + step - 1, size], fill=fg)
    else:  # checkerboard
        step = max(2, int(size / rng.integers(3, 6)))
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2 == 0:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=fg)
    arr = np.asarray(img).astype(np.float32) * rng.uniform(0.8, 1.15) + rng.normal(0, 5, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_heldout_faces(world: World, folder: Path) -> dict[str, list[Path]]:
    """Write `folder/<First_Last>/<j>.png`: every identity's held-out photos (what the attack sees)."""
    folder = Path(folder)
    out: dict[str, list[Path]] = {}
    for i, person in enumerate(world.identities):
        person_dir = folder / person.name.replace(" ", "_")
        person_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for j in range(world.config.heldout_photos):
            path = person_dir / f"{j:03d}.png"
            # Fast zlib level: 6,400 photos save ~25 % faster than at the default level, for 3 % more bytes.
            world.render_heldout_photo(i, j).save(path, compress_level=1)
            paths.append(path)
        out[person.name] = paths
    return out


def write_labels(world: World, path: Path) -> None:
    """labels.csv: name,member,occurrences,hard_kind,of (ground truth: exactly who was in the training captions).

    hard_kind is lookalike / namesake / empty, `of` the member a hard non-member resembles or shares a
    name with. The labels reader (`engine/query/labels.py`) reads name, member and occurrences and
    ignores further columns, so query and evaluate read this file as any user's labels.
    """
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["name", "member", "occurrences", "hard_kind", "of"])
        for person in world.identities:
            of = world.identities[person.hard_of].name if person.hard_of is not None else ""
            w.writerow([person.name, int(person.member), person.occurrences, person.hard_kind.value, of])
