"""Face-like pictures of synthetic identities, for the demo's world and the tests.

Nothing here is a real face. The images have structure a model can pick up: every identity has stable
traits (skin and hair colour, face shape, eye spacing, background), and every photo varies pose, scale,
light and noise around them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclass(frozen=True)
class FaceTraits:
    """The stable look of one synthetic identity (colours as RGB 0..255)."""

    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    eyes: tuple[int, int, int]
    background: tuple[int, int, int]  # the identity's usual surroundings (photos vary around it)
    face_aspect: float  # height / width of the face ellipse
    eye_spacing: float  # fraction of face width between the eyes
    hair_height: float  # fraction of face height covered by hair
    glasses: bool


def identity_traits(rng: np.random.Generator) -> FaceTraits:
    def colour(lo: int, hi: int) -> tuple[int, int, int]:
        return tuple(int(c) for c in rng.integers(lo, hi, size=3))

    return FaceTraits(
        skin=colour(90, 240), hair=colour(10, 200), eyes=colour(0, 140), background=colour(0, 255),
        face_aspect=float(rng.uniform(1.05, 1.5)), eye_spacing=float(rng.uniform(0.3, 0.55)),
        hair_height=float(rng.uniform(0.15, 0.45)), glasses=bool(rng.random() < 0.3),
    )


# The traits a look-alike may differ in from the person it resembles: small things (eye colour, eye
# spacing, glasses, usual surroundings). Skin, hair and face shape, what a face is recognised by, stay.
MINOR_TRAITS = ("eyes", "eye_spacing", "glasses", "background")


def lookalike_traits(traits: FaceTraits, rng: np.random.Generator) -> tuple[FaceTraits, str]:
    """The traits of someone who looks like `traits`' owner: the same but for one minor trait.

    Returns (the look-alike's traits, the name of the trait that differs).
    """
    differs = MINOR_TRAITS[int(rng.integers(len(MINOR_TRAITS)))]
    if differs == "eyes":
        changed = tuple(int(c) for c in rng.integers(0, 140, size=3))
    elif differs == "eye_spacing":
        # At least 0.06 away, still inside identity_traits' range: a visible but small change.
        low, high = 0.3, 0.55
        options = [x for x in (traits.eye_spacing - rng.uniform(0.06, 0.12), traits.eye_spacing + rng.uniform(0.06, 0.12))
                   if low <= x <= high]
        changed = float(options[int(rng.integers(len(options)))] if options else (low + high) / 2)
    elif differs == "glasses":
        changed = not traits.glasses
    else:
        changed = tuple(int(c) for c in rng.integers(0, 255, size=3))
    return replace(traits, **{differs: changed}), differs


def trait_vector(traits: FaceTraits) -> np.ndarray:
    """The traits as one vector with every component scaled to about 0..1, to measure how alike two people look."""
    return np.concatenate([
        np.asarray(traits.skin + traits.hair + traits.eyes + traits.background, dtype=np.float64) / 255.0,
        [(traits.face_aspect - 1.05) / 0.45, (traits.eye_spacing - 0.3) / 0.25, (traits.hair_height - 0.15) / 0.3,
         float(traits.glasses)],
    ])


def render_face(traits: FaceTraits, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One photo of an identity: its traits under random background, pose, scale, light and noise."""
    # The background drifts from photo to photo (half the time it is somewhere else entirely), so a
    # model has to recognise the face, not the wall behind it.
    if rng.random() < 0.5:
        background = tuple(int(c) for c in rng.integers(0, 255, size=3))
    else:
        background = tuple(int(np.clip(c + rng.normal(0, 25), 0, 255)) for c in traits.background)
    img = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(img)
    scale = rng.uniform(0.55, 0.8)
    w = size * scale * 0.7
    h = w * traits.face_aspect
    cx = size / 2 + rng.uniform(-0.08, 0.08) * size
    cy = size / 2 + rng.uniform(-0.06, 0.1) * size
    box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    d.ellipse(box, fill=traits.hair)  # hair behind the face
    d.ellipse([box[0], box[1] + h * traits.hair_height, box[2], box[3]], fill=traits.skin)
    eye_y = cy - h * 0.05
    r = max(1.0, w * 0.07)
    for side in (-1, 1):
        ex = cx + side * w * traits.eye_spacing / 2
        d.ellipse([ex - r, eye_y - r, ex + r, eye_y + r], fill=traits.eyes)
        if traits.glasses:
            d.ellipse([ex - 2 * r, eye_y - 2 * r, ex + 2 * r, eye_y + 2 * r], outline=(10, 10, 10),
                      width=max(1, size // 40))
    d.line([cx - w * 0.15, cy + h * 0.25, cx + w * 0.15, cy + h * 0.25], fill=(120, 40, 40), width=max(1, size // 32))
    img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR, fillcolor=background)
    arr = np.asarray(img).astype(np.float32)
    arr = arr * rng.uniform(0.75, 1.2) + rng.uniform(-20, 20, size=3)  # light and colour cast
    arr += rng.normal(0, 6, size=arr.shape)  # sensor noise
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    return img


def write_faces(folder: Path, names: list[str], images_per_person: int, seed: int = 0,
                size: int = 64) -> dict[str, list[Path]]:
    """Write `faces/<Name_With_Underscores>/<i>.png` for each name; return name -> image paths."""
    folder = Path(folder)
    out: dict[str, list[Path]] = {}
    for i, name in enumerate(names):
        rng = np.random.default_rng([seed, i])
        traits = identity_traits(rng)
        person_dir = folder / name.replace(" ", "_")
        person_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for j in range(images_per_person):
            path = person_dir / f"{j:03d}.png"
            render_face(traits, rng, size).save(path)
            paths.append(path)
        out[name] = paths
    return out
