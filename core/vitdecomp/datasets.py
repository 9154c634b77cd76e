"""A procedural concept world with ground truth: seeded images with known factors and a caption for each.

Every image shows one object on a textured background. Its factors are drawn independently and uniformly:

=========== =====================================================================
factor      values
=========== =====================================================================
shape       circle, square, triangle, cross
color       red, green, blue, yellow, purple, orange
pattern     plain, striped, dotted, checkered
position    top left, top right, bottom left, bottom right, center
size        small, large
background  water, grass, sand, snow
=========== =====================================================================

and its caption names them, e.g. ``"a large red striped triangle at the top left on water"``. Nothing is
downloaded; an image is drawn with numpy (2× supersampled, box-filtered) in well under a millisecond and depends
only on ``(seed, index)``, so datasets are random-access and reproducible across machines.

:class:`ConceptWorld` is the torch ``Dataset`` of that world. :class:`SpuriousConceptWorld` has the Waterbirds
structure: the label is the object's size (small vs large), the background (water vs grass) agrees with the label
in a fraction ``correlation`` of the *training* images and is independent of it in ``val`` and ``test``, whose four
groups (label × background) are exactly balanced. (Size, not shape, is the label because it is what the small
CPU-trained models of :mod:`vitdecomp.concept_world` learn reliably while still being a smaller visual signal than
the background.)

Images are returned as float tensors ``[3, S, S]`` normalised with :data:`MEAN` / :data:`STD` (pixel values
mapped from [0, 1] to [-1, 1]); :func:`normalize` / :func:`denormalize` convert.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "FACTORS", "FACTOR_NAMES", "GENERATOR_VERSION", "MEAN", "STD", "SPURIOUS_FACTOR", "SPURIOUS_LABELS", "SPURIOUS_BACKGROUNDS",
    "sample_factors", "render", "caption", "factor_phrase", "normalize", "denormalize",
    "ConceptWorld", "SpuriousConceptWorld", "WordTokenizer", "VOCABULARY",
]

#: Factor name → its values, in a fixed order (a factor's label is the index of its value here).
FACTORS: Dict[str, Tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "cross"),
    "color": ("red", "green", "blue", "yellow", "purple", "orange"),
    "pattern": ("plain", "striped", "dotted", "checkered"),
    "position": ("top left", "top right", "bottom left", "bottom right", "center"),
    "size": ("small", "large"),
    "background": ("water", "grass", "sand", "snow"),
}
FACTOR_NAMES: Tuple[str, ...] = tuple(FACTORS)

#: Normalisation applied to pixel values in [0, 1]: (x − MEAN) / STD.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

_RGB = {
    "red": (225, 35, 35),
    "green": (40, 200, 60),
    "blue": (45, 95, 240),
    "yellow": (240, 215, 35),
    "purple": (155, 55, 210),
    "orange": (250, 135, 20),
}
_CENTERS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
_RADIUS = {"small": 0.11, "large": 0.19}  # fraction of the image side
_POSITION_PHRASE = {
    "top left": "at the top left", "top right": "at the top right", "bottom left": "at the bottom left",
    "bottom right": "at the bottom right", "center": "in the center",
}

#: The Waterbirds-style variant: the label factor, its two classes, and the backgrounds (index 0/1 is the
#: majority background of class 0/1 in training).
SPURIOUS_FACTOR = "size"
SPURIOUS_LABELS: Tuple[str, ...] = ("small", "large")
SPURIOUS_BACKGROUNDS: Tuple[str, ...] = ("water", "grass")

Factors = Dict[str, str]

#: Bumped whenever the pixels or factors drawn for a given (seed, index) change (keys of image caches).
GENERATOR_VERSION = 1


# ---------------------------------------------------------------------------------------------- sampling
def sample_factors(rng: np.random.Generator, **fixed: str) -> Factors:
    """Draw every factor uniformly (a factor given as a keyword argument is kept as given)."""
    out = {}
    for name, values in FACTORS.items():
        if name in fixed and fixed[name] is not None:
            if fixed[name] not in values:
                raise ValueError(f"{name} must be one of {values}, got {fixed[name]!r}")
            out[name] = fixed[name]
        else:
            out[name] = values[int(rng.integers(len(values)))]
    unknown = set(fixed) - set(FACTORS)
    if unknown:
        raise ValueError(f"Unknown factors {sorted(unknown)}; factors are {list(FACTORS)}")
    return out


# ---------------------------------------------------------------------------------------------- drawing
def _background(kind: str, n: int, rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Background texture [n, n, 3] in [0, 1] on the supersampled grid (coordinates in image-side units)."""
    img = np.empty((n, n, 3), np.float32)
    if kind == "water":
        img[:] = np.array([20, 45, 115]) / 255
        phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(9, 13)
        wave = np.sin(2 * np.pi * (y * freq + 0.08 * np.sin(2 * np.pi * x * 3 + phase)) + phase)
        img[wave > 0.75] = np.array([70, 125, 200]) / 255
    elif kind == "grass":
        img[:] = np.array([35, 100, 40]) / 255
        cols = (x * n / 2).astype(int)
        blade = rng.random(n) < 0.35
        offs = rng.integers(0, 6, size=n)
        stripe = blade[np.clip(cols, 0, n - 1)] & (((y * n / 2).astype(int) + offs[np.clip(cols, 0, n - 1)]) % 6 < 3)
        img[stripe] = np.array([70, 150, 60]) / 255
    elif kind == "sand":
        img[:] = np.array([200, 170, 115]) / 255
        phase = rng.uniform(0, 2 * np.pi)
        dune = np.sin(2 * np.pi * (y * 4 + 0.15 * np.sin(2 * np.pi * x * 1.5 + phase)) + phase)
        img[dune > 0.85] = np.array([165, 130, 80]) / 255
    elif kind == "snow":
        img[:] = np.array([228, 233, 243]) / 255
        flakes = rng.random((n // 2, n // 2)) < 0.04
        flakes = flakes.repeat(2, 0).repeat(2, 1)
        img[flakes] = np.array([175, 185, 210]) / 255
    else:  # pragma: no cover - guarded by sample_factors
        raise ValueError(kind)
    return img


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = 0.85 * r
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "triangle":  # pointing up, circumradius r, centred on its centroid
        top, base = -r, 0.5 * r
        half = (dy - top) / (base - top) * (r * math.sqrt(3) / 2)
        return (dy >= top) & (dy <= base) & (np.abs(dx) <= half)
    if shape == "cross":
        s, t = 0.95 * r, 0.36 * r
        return ((np.abs(dx) <= s) & (np.abs(dy) <= t)) | ((np.abs(dx) <= t) & (np.abs(dy) <= s))
    raise ValueError(shape)  # pragma: no cover


def _pattern_mask(pattern: str, dx: np.ndarray, dy: np.ndarray, S: int) -> np.ndarray:
    """True where the pattern shows its dark second colour (coordinates in image-side units)."""
    px = 1.0 / S  # one output pixel
    if pattern == "plain":
        return np.zeros(dx.shape, bool)
    if pattern == "striped":
        period = 5 * px
        return np.mod(dx + dy, period) < period * 0.45
    if pattern == "dotted":
        period = 5 * px
        u = np.mod(dx, period) - period / 2
        v = np.mod(dy, period) - period / 2
        return u * u + v * v <= (1.35 * px) ** 2
    if pattern == "checkered":
        s = 3 * px
        return (np.floor(dx / s) + np.floor(dy / s)).astype(int) % 2 == 0
    raise ValueError(pattern)  # pragma: no cover


@functools.lru_cache(maxsize=8)
def _grid(n: int) -> Tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    y, x = np.meshgrid(coords, coords, indexing="ij")
    y.setflags(write=False)
    x.setflags(write=False)
    return y, x


def render(factors: Mapping[str, str], size: int = 64, rng: Optional[np.random.Generator] = None,
           jitter: bool = True) -> np.ndarray:
    """Draw one image: uint8 array ``[size, size, 3]``.

    ``rng`` drives the nuisance variation (object offset ±4% of the side, radius ±8%, background phase and noise);
    with ``jitter=False`` the object sits exactly at its nominal place and size.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    n = 2 * size  # supersampled grid
    y, x = _grid(n)
    img = _background(factors["background"], n, rng, y, x)
    cx, cy = _CENTERS[factors["position"]]
    r = _RADIUS[factors["size"]]
    if jitter:
        cx += rng.uniform(-0.04, 0.04)
        cy += rng.uniform(-0.04, 0.04)
        r *= rng.uniform(0.92, 1.08)
    dx, dy = x - cx, y - cy
    obj = _shape_mask(factors["shape"], dx, dy, r)
    dark = _pattern_mask(factors["pattern"], dx, dy, size)
    base = np.array(_RGB[factors["color"]], np.float32) / 255
    img[obj] = base
    img[obj & dark] = base * 0.3
    img = (img[0::2, 0::2] + img[1::2, 0::2] + img[0::2, 1::2] + img[1::2, 1::2]) * 0.25
    if jitter:
        img = img + rng.normal(0.0, 0.015, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- text
def factor_phrase(factor: str, value: str) -> str:
    """The caption fragment that names one factor alone, e.g. ``("color", "red")`` → ``"a red shape"``."""
    return caption({factor: value}, mention=(factor,))


def caption(factors: Mapping[str, str], mention: Optional[Iterable[str]] = None) -> str:
    """``"a {size} {color} {pattern} {shape} {position} on {background}"`` naming the factors in ``mention``
    (default: all). An unnamed shape reads ``"shape"``: ``caption(f, ["color"])`` → ``"a red shape"``."""
    m = set(FACTOR_NAMES if mention is None else mention)
    unknown = m - set(FACTOR_NAMES)
    if unknown:
        raise ValueError(f"Unknown factors {sorted(unknown)}; factors are {list(FACTORS)}")
    words = []
    for f in ("size", "color", "pattern"):
        if f in m:
            words.append(factors[f])
    words.append(factors["shape"] if "shape" in m else "shape")
    if "position" in m:
        words.append(_POSITION_PHRASE[factors["position"]])
    if "background" in m:
        words.append(f"on {factors['background']}")
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article] + words)


def _vocabulary() -> Tuple[str, ...]:
    words = ["a", "an", "shape", "at", "the", "in", "on", "of", "photo", "object", "image", "with", "and",
             "color", "pattern", "texture", "background", "left", "right", "top", "bottom", "center"]
    for values in FACTORS.values():
        for v in values:
            words.extend(v.split())
    return tuple(dict.fromkeys(words))


#: The words the concept world's text tower knows (captions use only these).
VOCABULARY: Tuple[str, ...] = _vocabulary()


class WordTokenizer:
    """A word-level tokenizer for the concept world's small CLIP (``open_clip``'s BPE vocabulary would put
    49k × width parameters into the embedding table).

    Ids: 0 padding, 1 start, 2 unknown word, 3… the words of ``vocabulary``, and the end token last, so that
    open_clip's ``argmax`` pooling of the text tower reads the end token. Punctuation is dropped, case ignored.
    """

    PAD, SOT, UNK = 0, 1, 2

    def __init__(self, vocabulary: Sequence[str] = VOCABULARY, context_length: int = 16):
        self.vocabulary = tuple(vocabulary)
        self.context_length = int(context_length)
        self.index = {w: i + 3 for i, w in enumerate(self.vocabulary)}
        self.eot = len(self.vocabulary) + 3
        self.vocab_size = self.eot + 1

    def encode(self, text: str) -> List[int]:
        words = re.findall(r"[a-z]+", text.lower())
        return [self.index.get(w, self.UNK) for w in words]

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        L = int(context_length or self.context_length)
        out = torch.zeros(len(texts), L, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.SOT] + self.encode(t)[: L - 2] + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


# ---------------------------------------------------------------------------------------------- tensors
def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` (or float in [0, 1]) → the normalised float tensor the models take."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    mean = torch.tensor(MEAN, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Normalised images → float in [0, 1] (for drawing)."""
    mean = torch.tensor(MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * std + mean).clamp(0, 1)


class ConceptWorld(torch.utils.data.Dataset):
    """``n`` seeded concept-world images with their factors and captions.

    ``item i`` depends only on ``(seed, i)``. ``target``: a factor name (its value index is the label), ``"factors"``
    (a ``LongTensor`` of all factor indices in :data:`FACTOR_NAMES` order) or ``"caption"``. ``transform`` (PIL
    image → anything) replaces the default normalised tensor. ``fixed`` pins factors (``ConceptWorld(8,
    color="red")``).
    """

    def __init__(self, n: int, seed: int = 0, *, image_size: int = 64, target: str = "factors", transform=None,
                 jitter: bool = True, **fixed: str):
        if n < 0:
            raise ValueError(f"n must be ≥ 0, got {n}")
        if target not in ("factors", "caption") and target not in FACTORS:
            raise ValueError(f"target must be 'factors', 'caption' or a factor {list(FACTORS)}; got {target!r}")
        self.n, self.seed, self.image_size, self.target = int(n), int(seed), int(image_size), target
        self.transform, self.jitter, self.fixed = transform, jitter, dict(fixed)
        sample_factors(np.random.default_rng(0), **self.fixed)  # validate
        self._factors = [self._sample(i) for i in range(self.n)]

    def _rng(self, i: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, i, stream])

    def _sample(self, i: int) -> Factors:
        return sample_factors(self._rng(i, 0), **self.fixed)

    def __len__(self) -> int:
        return self.n

    def factors(self, i: int) -> Factors:
        """The factors of image ``i`` (name → value)."""
        return dict(self._factors[i])

    def labels(self, factor: str) -> torch.Tensor:
        """``[n]`` value indices of ``factor`` for every image."""
        values = FACTORS[factor]
        return torch.tensor([values.index(f[factor]) for f in self._factors], dtype=torch.long)

    def factor_table(self) -> torch.Tensor:
        """``[n, len(FACTOR_NAMES)]`` value indices of every factor."""
        return torch.stack([self.labels(f) for f in FACTOR_NAMES], 1)

    def caption(self, i: int, mention: Optional[Iterable[str]] = None) -> str:
        return caption(self._factors[i], mention)

    def array(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 ``[S, S, 3]``."""
        return render(self._factors[i], self.image_size, self._rng(i, 1), jitter=self.jitter)

    def image(self, i: int):
        """Image ``i`` as a PIL image."""
        from PIL import Image

        return Image.fromarray(self.array(i))

    def tensor(self, i: int) -> torch.Tensor:
        return normalize(torch.from_numpy(self.array(i)).permute(2, 0, 1))

    def tensors(self, indices: Optional[Iterable[int]] = None) -> torch.Tensor:
        """Normalised images ``[k, 3, S, S]`` (all images by default)."""
        idx = range(self.n) if indices is None else list(indices)
        arr = np.stack([self.array(i) for i in idx]) if len(idx) else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        return normalize(torch.from_numpy(arr).permute(0, 3, 1, 2))

    def _target(self, i: int):
        if self.target == "factors":
            f = self._factors[i]
            return torch.tensor([FACTORS[k].index(f[k]) for k in FACTOR_NAMES], dtype=torch.long)
        if self.target == "caption":
            return self.caption(i)
        return FACTORS[self.target].index(self._factors[i][self.target])

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        x = self.transform(self.image(i)) if self.transform is not None else self.tensor(i)
        return x, self._target(i)


class SpuriousConceptWorld(ConceptWorld):
    """The Waterbirds structure in the concept world.

    Label y: the size, small (0) or large (1). Background b: water (0) or grass (1). Group = 2·y + b
    (``group_names``). In ``split="train"`` the background equals the label (small on water, large on grass) with
    probability ``correlation``; in ``"val"`` and ``"test"`` the four groups are exactly balanced (image i is in
    group i mod 4). The other factors are drawn uniformly. ``target`` defaults to the label; items are
    ``(image, label)`` and :meth:`groups` gives the groups.
    """

    group_names = ("small on water", "small on grass", "large on water", "large on grass")

    def __init__(self, n: int, seed: int = 0, *, split: str = "train", correlation: float = 0.95,
                 image_size: int = 64, transform=None, jitter: bool = True):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if not 0.0 <= correlation <= 1.0:
            raise ValueError(f"correlation must lie in [0, 1], got {correlation}")
        self.split, self.correlation = split, float(correlation)
        # distinct streams per split so that train / val / test never share images
        offset = {"train": 0, "val": 1_000_003, "test": 2_000_003}[split]
        super().__init__(n, seed * 7919 + offset, image_size=image_size, target=SPURIOUS_FACTOR, transform=transform,
                         jitter=jitter)

    def _sample(self, i: int) -> Factors:
        rng = self._rng(i, 0)
        if self.split == "train":
            y = int(rng.integers(2))
            b = y if rng.random() < self.correlation else 1 - y
        else:
            g = i % 4
            y, b = g // 2, g % 2
        return sample_factors(rng, background=SPURIOUS_BACKGROUNDS[b], **{SPURIOUS_FACTOR: SPURIOUS_LABELS[y]})

    def labels(self, factor: str = "label") -> torch.Tensor:
        if factor == "label":
            return torch.tensor([SPURIOUS_LABELS.index(f[SPURIOUS_FACTOR]) for f in self._factors], dtype=torch.long)
        return super().labels(factor)

    def groups(self) -> torch.Tensor:
        """``[n]`` group indices 2·y + b."""
        y = self.labels("label")
        b = torch.tensor([SPURIOUS_BACKGROUNDS.index(f["background"]) for f in self._factors], dtype=torch.long)
        return 2 * y + b

    def _target(self, i: int):
        return SPURIOUS_LABELS.index(self._factors[i][SPURIOUS_FACTOR])
