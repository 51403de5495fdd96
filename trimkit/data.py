"""Vision-language data: procedurally generated tasks, a folder format, and the ``--data`` spec.

Data specs
----------
``synthetic:<task>[?opt=value&...]``
    A task generated on the fly, deterministic by seed, nothing downloaded. Tasks:

    * ``vqa`` -- a question about the scene, answered by one of a fixed list of answer classes
      (colours, shapes, sizes, counts ``zero``..``five``, ``yes``/``no``). Every object a
      question names is the only object in the scene that matches the description.
    * ``truefalse`` -- a statement about the scene (NLVR2 / SNLI-VE shape); label 1 when it is
      true, 0 when false; the two labels are exactly balanced over every pair of indices.
    * ``retrieval`` -- an image and a caption that lists every object; items are matched pairs
      (label 1). :func:`itm_pairs` adds a mismatched caption for every pair (label 0), and
      :func:`metric` scores an image-by-caption similarity matrix with recall@1, or the match
      scores of those pairs with ``itm_accuracy`` (the share of pairs classified right).

    Options: ``n`` (samples, default 1000), ``seed`` (default 0), ``image`` (side in pixels,
    default 64; 32..1024), ``split`` (``train``/``val``/``test``), ``objects`` (``2-5`` or
    ``3``: objects per scene, 1..16), ``texture`` (``1`` lightly textured backgrounds, ``0``
    plain ones), ``jitter`` (``1`` each object shifted at random inside its grid cell, ``0``
    centred in it; the scenes are otherwise the same), ``grid`` (objects sit on the cells of a
    ``grid`` x ``grid`` layout and are sized to them, 2..16, default 4), ``questions`` (VQA
    only: ``yesno``, the default, ``open`` or ``where``, see :func:`vqa_question`). Splits draw from
    separate seed streams, so they never share a scene.

``folder:PATH[?opt=value&...]`` or a plain ``PATH`` to a folder
    Your own data, laid out as::

        PATH/data.jsonl      one JSON object per line:
                             {"image": "images/0001.png", "text": "what colour is ...?",
                              "label": "red", "split": "train"}
        PATH/answers.json    optional: ["red", "green", ...], the answer classes in label order

    * ``image``: a path relative to ``PATH`` to a ``.png``/``.jpg`` file (read with Pillow) or a
      ``.npy`` array of shape ``[H, W, 3]`` or ``[3, H, W]``, ``uint8`` in 0..255 or float in
      0..1. Images are resized to ``image`` x ``image`` pixels (option, default 64).
    * ``text``: the question, statement or caption.
    * ``label``: an ``int`` class index, or a ``str`` answer. String labels are looked up in
      ``answers.json`` when present, otherwise the answer classes are the sorted distinct
      labels. Leave ``label`` out on every line for a retrieval folder (matched pairs).
    * ``split`` (optional): ``train``, ``val`` or ``test``. When no line has one, every split
      reads all lines.

    Options: ``task`` (``vqa``, ``truefalse`` or ``retrieval``; default: ``retrieval`` when no
    line has a label, ``truefalse`` when every label is 0 or 1 and there is no
    ``answers.json``, else ``vqa``), ``n`` (first ``n`` lines of the split), ``image``,
    ``split``. The tokenizer's vocabulary is built from the folder's texts.

Items are dicts: ``pixel_values`` float ``[3, H, W]`` normalised with :data:`IMAGE_MEAN` and
:data:`IMAGE_STD` (close to zero mean, unit variance on synthetic scenes), ``input_ids`` and
``attention_mask`` ``[T]`` (``[CLS]`` first, ``[SEP]`` last, no padding) and ``labels`` (a 0-d
long tensor). :func:`collate` stacks them and pads text with ``[PAD]`` = 0.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from itertools import product
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from trimkit.errors import DataError

__all__ = [
    "COLOURS", "SHAPES", "SIZES", "TASKS", "VQA_ANSWERS", "IMAGE_MEAN", "IMAGE_STD",
    "SceneObject", "Scene", "generate_scene", "render_scene",
    "vqa_question", "where_question", "WHERE_TYPES", "WHERE_ODDS", "truefalse_statement", "caption", "negative_caption",
    "WordTokenizer", "DataSpec", "parse_data_spec", "format_data_spec",
    "Record", "VLDataset", "load_dataset", "itm_pairs", "collate", "metric", "recall_at_k",
    "normalize_image",
]

# ----------------------------------------------------------------------------- scenes

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.15),
    "purple": (0.60, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.08),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
SIZES: tuple[str, ...] = ("small", "large")
TASKS: tuple[str, ...] = ("vqa", "truefalse", "retrieval")
SPLITS: tuple[str, ...] = ("train", "val", "test")
GRID = 4

_PLURAL = {"square": "squares", "circle": "circles", "triangle": "triangles", "cross": "crosses"}
_NUMBERS = ("zero", "one", "two", "three", "four", "five")
_RADIUS = {"small": 0.24, "large": 0.42}  # fraction of a grid cell
_POOLS: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES}

VQA_ANSWERS: tuple[str, ...] = (*COLOURS, *SHAPES, *SIZES, *_NUMBERS, "yes", "no")

# Per-channel pixel statistics of synthetic scenes (measured over 3000 textured and 3000 plain ones).
IMAGE_MEAN: tuple[float, float, float] = (0.340, 0.330, 0.324)
IMAGE_STD: tuple[float, float, float] = (0.136, 0.105, 0.113)
_MEAN_T = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
_STD_T = torch.tensor(IMAGE_STD).view(3, 1, 1)


@dataclass(frozen=True)
class SceneObject:
    """One object: its attributes, its grid cell and its pixel centre and radius."""

    colour: str
    shape: str
    size: str
    row: int
    col: int
    cy: float
    cx: float
    radius: float

    @property
    def attrs(self) -> tuple[str, str, str]:
        return (self.size, self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """Objects (row-major order) and the image ``[3, H, W]`` float32 in 0..1."""

    objects: tuple[SceneObject, ...]
    image: np.ndarray


def _place_objects(rng: np.random.Generator, image_size: int, count: int,
                   jitter: bool = True, grid: int = GRID) -> tuple[SceneObject, ...]:
    cell = image_size / grid
    cells = sorted(rng.permutation(grid * grid)[:count].tolist())
    colours = list(COLOURS)
    objects = []
    for idx in cells:
        row, col = divmod(idx, grid)
        size = SIZES[int(rng.integers(len(SIZES)))]
        radius = _RADIUS[size] * cell
        slack = max(cell / 2 - radius - 1.0, 0.0) if jitter else 0.0
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        objects.append(SceneObject(
            colour=colours[int(rng.integers(len(colours)))],
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            size=size, row=row, col=col, cy=float(cy), cx=float(cx), radius=float(radius),
        ))
    return tuple(objects)


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    if shape == "square":
        return (np.abs(dy) <= 0.85 * r) & (np.abs(dx) <= 0.85 * r)
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "triangle":
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        arm = r / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


@lru_cache(maxsize=8)
def _axis(image_size: int) -> np.ndarray:
    axis = np.linspace(-1.0, 1.0, image_size, dtype=np.float32)
    axis.setflags(write=False)
    return axis


def _background(rng: np.random.Generator, image_size: int, texture: bool) -> np.ndarray:
    """A grey-ish base tone; textured: plus a faint linear gradient and faint noise (stays in 0..1)."""
    base = (rng.uniform(0.22, 0.42) + rng.uniform(-0.03, 0.03, size=3)).astype(np.float32)
    if not texture:
        return np.repeat(np.repeat(base[:, None, None], image_size, axis=1), image_size, axis=2)
    axis = _axis(image_size)
    angle = rng.uniform(0, 2 * np.pi)
    light = np.float32(0.06 * np.cos(angle)) * axis[None, :] + np.float32(0.06 * np.sin(angle)) * axis[:, None]
    light += np.float32(0.08) * (rng.random((image_size, image_size), dtype=np.float32) - np.float32(0.5))
    return base[:, None, None] + light[None]


def render_scene(objects: Sequence[SceneObject], image_size: int, rng: np.random.Generator,
                 texture: bool = True) -> np.ndarray:
    """Draw ``objects`` on a plain or lightly textured background: ``[3, H, W]`` float32 in 0..1."""
    image = _background(rng, image_size, texture)
    for obj in objects:
        r = obj.radius
        y0, y1 = max(int(obj.cy - r) - 1, 0), min(int(obj.cy + r) + 2, image_size)
        x0, x1 = max(int(obj.cx - r) - 1, 0), min(int(obj.cx + r) + 2, image_size)
        ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - obj.cy
        xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - obj.cx
        mask = _shape_mask(obj.shape, ys, xs, r)
        rgb = np.clip(np.asarray(COLOURS[obj.colour]) + rng.uniform(-0.04, 0.04, size=3), 0, 1)
        patch = image[:, y0:y1, x0:x1]
        patch[:, mask] = rgb[:, None].astype(np.float32)
    return image


def generate_scene(rng: np.random.Generator, image_size: int = 64, *,
                   objects: tuple[int, int] = (2, 5), texture: bool = True, jitter: bool = True,
                   grid: int = GRID) -> Scene:
    """A random scene: ``objects[0]..objects[1]`` objects on distinct cells of a ``grid`` x ``grid``
    layout (default 4x4), each shifted at random inside its cell (``jitter``) or centred in it (the
    same scene otherwise). Objects are sized relative to their cell."""
    lo, hi = objects
    if not 2 <= grid <= 16:
        raise ValueError(f"grid must be in 2..16, got {grid}")
    if not 1 <= lo <= hi <= grid * grid:
        raise ValueError(f"objects must satisfy 1 <= min <= max <= {grid * grid}, got {objects}")
    count = int(rng.integers(lo, hi + 1))
    placed = _place_objects(rng, image_size, count, jitter, grid)
    return Scene(objects=placed, image=render_scene(placed, image_size, rng, texture))


# ----------------------------------------------------------------------------- language

_DESCRIPTOR_KEYS: tuple[tuple[str, ...], ...] = (
    ("shape",), ("colour",), ("size", "shape"), ("colour", "shape"), ("size", "colour", "shape"),
)


def _values(obj: SceneObject, key: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(getattr(obj, k) for k in key)


def _phrase(obj: SceneObject, key: tuple[str, ...]) -> str:
    words = [getattr(obj, k) for k in ("size", "colour", "shape") if k in key]
    if "shape" not in key:
        words.append("object")
    return "the " + " ".join(words)


def _unique_keys(objects: Sequence[SceneObject]) -> list[list[tuple[str, ...]]]:
    """Per object, the descriptor keys whose values match that object and no other."""
    counts = {key: Counter(_values(o, key) for o in objects) for key in _DESCRIPTOR_KEYS}
    return [[key for key in _DESCRIPTOR_KEYS if counts[key][_values(o, key)] == 1] for o in objects]


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _described(rng: np.random.Generator, objects: Sequence[SceneObject], keys: list, exclude: str):
    """A random (object, phrase) pair where the phrase names only that object and does not
    mention attribute ``exclude``, or None."""
    options = [(o, k) for o, ks in zip(objects, keys) for k in ks if exclude not in k]
    if not options:
        return None
    obj, key = _pick(rng, options)
    return obj, _phrase(obj, key)


def _relation(rng: np.random.Generator, objects: Sequence[SceneObject], keys: list, axis: str):
    """Two uniquely described objects on different columns (``axis="h"``) or rows, or None."""
    attr = "col" if axis == "h" else "row"
    named = [(o, ks) for o, ks in zip(objects, keys) if ks]
    pairs = [(a, b) for a in named for b in named if getattr(a[0], attr) != getattr(b[0], attr)]
    if not pairs:
        return None
    (a, ka), (b, kb) = _pick(rng, pairs)
    return a, _phrase(a, _pick(rng, ka)), b, _phrase(b, _pick(rng, kb))


_RELATION_WORDS = {"h": ("left of", "right of"), "v": ("above", "below")}


def _relation_holds(a: SceneObject, b: SceneObject, word: str) -> bool:
    return {"left of": a.col < b.col, "right of": a.col > b.col,
            "above": a.row < b.row, "below": a.row > b.row}[word]


QUESTION_SETS: tuple[str, ...] = ("yesno", "open", "where")
WHERE_TYPES: tuple[str, ...] = ("shape", "colour", "exists")
WHERE_ODDS: tuple[float, ...] = (0.4, 0.4, 0.2)


def _relation_target(rng: np.random.Generator, objects: Sequence[SceneObject], keys: list, kind: str):
    """For ``kind="direction"``: a uniquely described object and a direction word with exactly one
    other object that way; for ``"closest"``: a uniquely described object whose nearest other
    object (by grid cells) is unique. Returns ``(reference phrase, word, target)`` or None."""
    options = []
    for ref, ref_keys in zip(objects, keys):
        others = [o for o in objects if o is not ref]
        if not ref_keys or not others:
            continue
        if kind == "direction":
            for word in ("left of", "right of", "above", "below"):
                hits = [o for o in others if _relation_holds(o, ref, word)]
                if len(hits) == 1:
                    options.append((ref, ref_keys, word, hits[0]))
        else:
            dist = sorted(((o.row - ref.row) ** 2 + (o.col - ref.col) ** 2, i) for i, o in enumerate(others))
            if len(dist) == 1 or dist[0][0] < dist[1][0]:
                options.append((ref, ref_keys, "closest to", others[dist[0][1]]))
    if not options:
        return None
    ref, ref_keys, word, target = _pick(rng, options)
    return _phrase(ref, _pick(rng, ref_keys)), word, target


def _count_question(rng: np.random.Generator, objects: Sequence[SceneObject]) -> tuple[str, str] | None:
    attr = _pick(rng, ("shape", "colour"))
    value = getattr(_pick(rng, objects), attr) if rng.integers(2) else _pick(rng, _POOLS[attr])
    n = sum(getattr(o, attr) == value for o in objects)
    if n >= len(_NUMBERS):
        return None
    noun = _PLURAL[value] if attr == "shape" else f"{value} objects"
    return f"how many {noun} are there ?", _NUMBERS[n]


def vqa_question(rng: np.random.Generator, objects: Sequence[SceneObject],
                 questions: str = "yesno") -> tuple[str, str]:
    """A question about the scene and its answer (one of :data:`VQA_ANSWERS`).

    questions ``yesno``: attributes of a named object, counts of a shape or colour, and "is A left
    of / right of / above / below B ?" answered yes or no. ``open``: attributes and counts as
    before, plus "how many objects are there ?", and relations that ask for the colour or shape
    of the object left of / right of / above / below / closest to a named one. (A yes/no relation
    hides its answer behind the relation word *and* two objects; the open form names what to
    look at. It did not make the bench's small models learn faster, see ``trimkit/bench/README.md``.)
    ``where``: every question names one object among the others and asks what only the image
    shows, see :func:`where_question`.
    """
    if questions not in QUESTION_SETS:
        raise ValueError(f"unknown question set {questions!r}; expected one of {', '.join(QUESTION_SETS)}")
    if questions == "where":
        return where_question(rng, objects)
    kinds = ["colour", "shape", "size", "count", "h", "v"] if questions == "yesno" else \
        ["colour", "shape", "size", "count", "direction", "closest"]
    keys = _unique_keys(objects)
    while kinds:
        kind = kinds.pop(int(rng.integers(len(kinds))))
        if kind in ("colour", "shape", "size"):
            found = _described(rng, objects, keys, kind)
            if found:
                obj, phrase = found
                return f"what {kind} is {phrase} ?", getattr(obj, kind)
        elif kind == "count":
            if questions == "open" and len(objects) < len(_NUMBERS) and rng.integers(3) == 0:
                return "how many objects are there ?", _NUMBERS[len(objects)]
            found = _count_question(rng, objects)
            if found:
                return found
        elif kind in ("direction", "closest"):
            found = _relation_target(rng, objects, keys, kind)
            if found:
                phrase, word, target = found
                attr = _pick(rng, ("colour", "shape"))
                return f"what {attr} is the object {word} {phrase} ?", getattr(target, attr)
        else:
            found = _relation(rng, objects, keys, kind)
            if found:
                a, pa, b, pb = found
                word = _pick(rng, _RELATION_WORDS[kind])
                return f"is {pa} {word} {pb} ?", "yes" if _relation_holds(a, b, word) else "no"
    raise ValueError(f"no question fits a scene of {len(objects)} objects; counts stop at five")


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def _exists_question(rng: np.random.Generator, objects: Sequence[SceneObject]) -> tuple[str, str]:
    """"is there a <colour> <shape> ?", yes or no with equal odds. A "no" pairs a colour and a shape
    that are both in the scene but never on one object when the scene has such a pair."""
    present = {(o.colour, o.shape) for o in objects}
    if rng.integers(2):
        colour, shape = _pick(rng, sorted(present))
        answer = "yes"
    else:
        hard = [(c, s) for c in sorted({o.colour for o in objects}) for s in sorted({o.shape for o in objects})
                if (c, s) not in present]
        colour, shape = _pick(rng, hard or [p for p in product(COLOURS, SHAPES) if p not in present])
        answer = "no"
    return f"is there {_article(colour)} {colour} {shape} ?", answer


def where_question(rng: np.random.Generator, objects: Sequence[SceneObject]) -> tuple[str, str]:
    """A question that names one object and asks for what only the image shows (question set
    ``where``), one of :data:`WHERE_TYPES` drawn with odds :data:`WHERE_ODDS`:

    * ``shape``: "what shape is the red object ?" -- the only red object; the answer is its shape;
    * ``colour``: "what colour is the circle ?" -- the only circle; the answer is its colour;
    * ``exists``: "is there a blue triangle ?" -- yes or no with equal odds (see `_exists_question`).

    The other objects are distractors: they may share the named object's shape (for ``shape``) or
    colour (for ``colour``), so the answer is read at the named object's place. The question alone
    gives 1/4 (shape), 1/6 (colour) and 1/2 (exists). `ValueError` when the drawn type does not fit
    the scene (no object with a colour, or a shape, of its own), so that the types keep their odds
    over redrawn scenes.
    """
    kind = WHERE_TYPES[int(rng.choice(len(WHERE_TYPES), p=WHERE_ODDS))]
    if kind == "exists":
        return _exists_question(rng, objects)
    named = "colour" if kind == "shape" else "shape"
    candidates = [o for o in objects if sum(getattr(p, named) == getattr(o, named) for p in objects) == 1]
    if not candidates:
        raise ValueError(f"no object has a {named} of its own")
    obj = _pick(rng, candidates)
    return f"what {kind} is {_phrase(obj, (named,))} ?", getattr(obj, kind)


def _count_sentence(n: int, noun_singular: str, noun_plural: str) -> str:
    if n == 1:
        return f"there is exactly one {noun_singular}"
    return f"there are exactly {_NUMBERS[n]} {noun_plural}"


def truefalse_statement(rng: np.random.Generator, objects: Sequence[SceneObject], truth: bool) -> str:
    """A statement about the scene that is true when ``truth`` is, false otherwise."""
    kinds = ["exists", "attribute", "count", "relation"]
    keys = _unique_keys(objects)
    while kinds:
        kind = kinds.pop(int(rng.integers(len(kinds))))
        if kind == "exists":
            key = _pick(rng, (("colour", "shape"), ("size", "colour", "shape")))
            if truth:
                values = _values(_pick(rng, objects), key)
            else:
                present = {_values(o, key) for o in objects}
                values = _pick(rng, [v for v in product(*(_POOLS[k] for k in key)) if v not in present])
            noun = " ".join(values)
            return f"there is {'an' if noun[0] in 'aeiou' else 'a'} {noun}"
        if kind == "attribute":
            attr = _pick(rng, ("colour", "shape", "size"))
            found = _described(rng, objects, keys, attr)
            if found:
                obj, phrase = found
                actual = getattr(obj, attr)
                value = actual if truth else _pick(rng, [v for v in _POOLS[attr] if v != actual])
                return f"{phrase} is {'a ' + value if attr == 'shape' else value}"
        elif kind == "count":
            shape = _pick(rng, SHAPES)
            actual = sum(o.shape == shape for o in objects)
            if actual < len(_NUMBERS):
                near = [k for k in (actual - 1, actual + 1) if 0 <= k < len(_NUMBERS)]
                n = actual if truth else _pick(rng, near)
                return _count_sentence(n, shape, _PLURAL[shape])
        else:
            axis = _pick(rng, ("h", "v"))
            found = _relation(rng, objects, keys, axis)
            if found:
                a, pa, b, pb = found
                word = _RELATION_WORDS[axis][0] if _relation_holds(a, b, _RELATION_WORDS[axis][0]) == truth \
                    else _RELATION_WORDS[axis][1]
                return f"{pa} is {word} {pb}"
    raise ValueError("scene has nothing to state")  # unreachable: "exists" always fits


def caption(objects: Sequence[SceneObject]) -> str:
    """Every object in row-major order: ``"a small red circle , a large blue cross and ..."``."""
    parts = [f"a {o.size} {o.colour} {o.shape}" for o in objects]
    if len(parts) == 1:
        return parts[0]
    return " , ".join(parts[:-1]) + " and " + parts[-1]


def negative_caption(rng: np.random.Generator, objects: Sequence[SceneObject]) -> str:
    """A caption for a slightly different scene: one attribute changed, or two objects' colours or
    shapes swapped. The described multiset of objects always differs from the real one."""
    objs = list(objects)
    swappable = [(i, j, a) for i in range(len(objs)) for j in range(i + 1, len(objs))
                 for a, b in (("colour", "shape"), ("shape", "colour"))
                 if getattr(objs[i], a) != getattr(objs[j], a) and getattr(objs[i], b) != getattr(objs[j], b)]
    if swappable and rng.integers(2):
        i, j, attr = _pick(rng, swappable)
        vi, vj = getattr(objs[i], attr), getattr(objs[j], attr)
        objs[i], objs[j] = replace(objs[i], **{attr: vj}), replace(objs[j], **{attr: vi})
    else:
        i = int(rng.integers(len(objs)))
        attr = _pick(rng, ("colour", "shape", "size"))
        other = [v for v in _POOLS[attr] if v != getattr(objs[i], attr)]
        objs[i] = replace(objs[i], **{attr: _pick(rng, other)})
    return caption(objs)


def _task_words(task: str, questions: str = "yesno") -> list[str]:
    words = {*COLOURS, *SHAPES, *SIZES, "the", "a", "object"}
    if task == "vqa":
        words |= {"what", "is", "colour", "shape", "size", "how", "many", "are", "there", "objects",
                  "left", "right", "of", "above", "below", "?", *_PLURAL.values()}
        if questions == "open":
            words |= {"closest", "to"}
        elif questions == "where":
            words |= {"an"}
    elif task == "truefalse":
        words |= {"there", "is", "are", "an", "exactly", "left", "right", "of", "above", "below",
                  *_NUMBERS, *_PLURAL.values()}
    elif task == "retrieval":
        words |= {",", "and"}
    return sorted(words)


# ----------------------------------------------------------------------------- tokenizer

_TOKEN_RE = re.compile(r"[\w']+|[^\w\s]")


class WordTokenizer:
    """Lower-case word-level tokenizer: ``[PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3``, then the words."""

    SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")
    pad_token_id, cls_token_id, sep_token_id, unk_token_id = 0, 1, 2, 3

    def __init__(self, words: Iterable[str]):
        vocab = list(self.SPECIALS)
        seen = set(vocab)
        for word in words:
            word = word.lower()
            if word not in seen:
                seen.add(word)
                vocab.append(word)
        self.vocab: dict[str, int] = {w: i for i, w in enumerate(vocab)}
        self.id_to_word: list[str] = vocab

    @classmethod
    def from_texts(cls, texts: Iterable[str], max_words: int | None = None) -> "WordTokenizer":
        """Vocabulary of ``texts``, most frequent first (ties alphabetical), at most ``max_words``."""
        counts = Counter(tok for text in texts for tok in cls.tokenize(text))
        ranked = sorted(counts, key=lambda w: (-counts[w], w))
        return cls(ranked[:max_words] if max_words is not None else ranked)

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_word)

    def __len__(self) -> int:
        return self.vocab_size

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return _TOKEN_RE.findall(text.lower())

    def encode_one(self, text: str, max_len: int | None = None) -> list[int]:
        """``[CLS] words [SEP]``, truncated to ``max_len`` (keeping the final ``[SEP]``)."""
        ids = [self.cls_token_id, *(self.vocab.get(t, self.unk_token_id) for t in self.tokenize(text)),
               self.sep_token_id]
        if max_len is not None:
            if max_len < 2:
                raise ValueError(f"max_len must be at least 2 ([CLS] and [SEP]), got {max_len}")
            if len(ids) > max_len:
                ids = ids[: max_len - 1] + [self.sep_token_id]
        return ids

    def encode(self, texts: str | Sequence[str], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids, attention_mask``, both ``[B, T]`` long, padded to the longest text."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.encode_one(t, max_len) for t in texts]
        width = max((len(r) for r in rows), default=2)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask

    def __call__(self, texts: str | Sequence[str], max_len: int | None = None) -> dict[str, torch.Tensor]:
        ids, mask = self.encode(texts, max_len)
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        words = [self.id_to_word[int(i)] for i in ids]
        if skip_special:
            words = [w for w in words if w not in self.SPECIALS]
        return " ".join(words)


# ----------------------------------------------------------------------------- spec

_SYNTHETIC_OPTIONS = ("n", "seed", "image", "split", "objects", "texture", "jitter", "grid", "questions")
_FOLDER_OPTIONS = ("n", "image", "split", "task")
_DEFAULT_N = 1000
_DEFAULT_IMAGE = 64


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` spec. ``source`` is ``synthetic`` or ``folder``; for a folder ``task``
    may be ``auto`` (decided from the labels on load), ``n`` is ``None`` for every line and
    ``path`` names the folder. ``extra`` holds the synthetic options ``objects`` (min, max),
    ``texture`` and ``jitter`` (bools), ``grid`` (int) and ``questions`` (a question set)."""

    task: str
    n: int | None = _DEFAULT_N
    seed: int = 0
    image: int = _DEFAULT_IMAGE
    split: str = "train"
    extra: dict = field(default_factory=dict)
    source: str = "synthetic"
    path: str | None = None


def _int_option(name: str, value: str, lo: int, hi: int) -> int:
    try:
        out = int(value)
    except ValueError:
        raise DataError(f"data option {name}={value!r} is not an integer; expected {lo}..{hi}") from None
    if not lo <= out <= hi:
        raise DataError(f"data option {name}={out} is out of range; expected {lo}..{hi}")
    return out


def _objects_option(value: str, grid: int = GRID) -> tuple[int, int]:
    cells = grid * grid
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", value.strip())
    if not m:
        raise DataError(f"data option objects={value!r} is invalid; expected N or MIN-MAX within 1..{cells}")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if not 1 <= lo <= hi <= cells:
        raise DataError(f"data option objects={value!r} is invalid; expected N or MIN-MAX within 1..{cells}"
                        f" (the cells of a {grid}x{grid} grid)")
    return lo, hi


def _split_option(value: str) -> str:
    if value not in SPLITS:
        raise DataError(f"data option split={value!r} is invalid; expected one of {', '.join(SPLITS)}")
    return value


def _parse_options(query: str, valid: Sequence[str], spec: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        name, eq, value = part.partition("=")
        if name not in valid:
            raise DataError(f"unknown data option {name!r} in {spec!r}; valid options: {', '.join(valid)}")
        if not eq or not value:
            raise DataError(f"data option {name!r} in {spec!r} needs a value ({name}=...)")
        if name in options:
            raise DataError(f"data option {name!r} given twice in {spec!r}")
        options[name] = value
    return options


def parse_data_spec(spec: str) -> DataSpec:
    """Parse ``synthetic:<task>?opt=v&...``, ``folder:PATH?opt=v&...`` or a folder path."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec {spec!r}; expected synthetic:<task> ({', '.join(TASKS)}) or folder:PATH")
    spec = spec.strip()
    if spec.startswith("synthetic:"):
        task, _, query = spec[len("synthetic:"):].partition("?")
        if task not in TASKS:
            raise DataError(f"unknown synthetic task {task!r} in {spec!r}; valid tasks: {', '.join(TASKS)}")
        opts = _parse_options(query, _SYNTHETIC_OPTIONS, spec)
        texture, jitter = opts.get("texture", "1"), opts.get("jitter", "1")
        for name, value in (("texture", texture), ("jitter", jitter)):
            if value not in ("0", "1"):
                raise DataError(f"data option {name}={value!r} is invalid; expected 0 or 1")
        grid = _int_option("grid", opts["grid"], 2, 16) if "grid" in opts else GRID
        questions = opts.get("questions", "yesno")
        if questions not in QUESTION_SETS:
            raise DataError(f"data option questions={questions!r} is invalid; expected one of "
                            f"{', '.join(QUESTION_SETS)}")
        if questions != "yesno" and task != "vqa":
            raise DataError(f"data option questions={questions!r} is for synthetic:vqa, not {task}")
        return DataSpec(
            task=task,
            n=_int_option("n", opts["n"], 1, 10_000_000) if "n" in opts else _DEFAULT_N,
            seed=_int_option("seed", opts["seed"], 0, 2**63 - 1) if "seed" in opts else 0,
            image=_int_option("image", opts["image"], 32, 1024) if "image" in opts else _DEFAULT_IMAGE,
            split=_split_option(opts.get("split", "train")),
            extra={"objects": _objects_option(opts.get("objects", "2-5"), grid), "texture": texture == "1",
                   "jitter": jitter == "1", "grid": grid, "questions": questions},
        )
    if spec.startswith("folder:"):
        body = spec[len("folder:"):]
    elif "/" in spec or "\\" in spec or spec.startswith(".") or Path(spec.partition("?")[0]).is_dir():
        body = spec
    else:
        hint = f" (did you mean synthetic:{spec}?)" if spec in TASKS else ""
        raise DataError(f"unknown data spec {spec!r}{hint}; expected synthetic:<task> "
                        f"({', '.join(TASKS)}), folder:PATH or a path to a folder")
    path, _, query = body.partition("?")
    if not path:
        raise DataError(f"data spec {spec!r} names no folder; expected folder:PATH")
    opts = _parse_options(query, _FOLDER_OPTIONS, spec)
    task = opts.get("task", "auto")
    if task not in TASKS and task != "auto":
        raise DataError(f"data option task={task!r} is invalid; expected one of {', '.join(TASKS)}")
    return DataSpec(
        task=task,
        n=_int_option("n", opts["n"], 1, 10**12) if "n" in opts else None,
        seed=0,
        image=_int_option("image", opts["image"], 8, 4096) if "image" in opts else _DEFAULT_IMAGE,
        split=_split_option(opts.get("split", "train")),
        source="folder",
        path=path,
    )


def format_data_spec(spec: DataSpec) -> str:
    """The canonical string for ``spec``; ``parse_data_spec`` reads it back to an equal spec."""
    if spec.source == "synthetic":
        lo, hi = spec.extra.get("objects", (2, 5))
        texture = int(bool(spec.extra.get("texture", True)))
        # options at their defaults are left out, so specs written before they existed read the same
        jitter = "" if spec.extra.get("jitter", True) else "&jitter=0"
        grid = spec.extra.get("grid", GRID)
        questions = spec.extra.get("questions", "yesno")
        more = ("" if grid == GRID else f"&grid={grid}") + ("" if questions == "yesno" else f"&questions={questions}")
        return (f"synthetic:{spec.task}?n={spec.n}&seed={spec.seed}&image={spec.image}"
                f"&split={spec.split}&objects={lo}-{hi}&texture={texture}{jitter}{more}")
    opts = [f"image={spec.image}", f"split={spec.split}"]
    if spec.n is not None:
        opts.insert(0, f"n={spec.n}")
    if spec.task != "auto":
        opts.append(f"task={spec.task}")
    return f"folder:{spec.path}?" + "&".join(opts)


# ----------------------------------------------------------------------------- datasets


def normalize_image(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``[3, H, W]`` in 0..1 -> float32 normalised with :data:`IMAGE_MEAN` / :data:`IMAGE_STD`."""
    image = torch.as_tensor(image, dtype=torch.float32)
    return (image - _MEAN_T) / _STD_T


@dataclass(frozen=True)
class Record:
    """One sample before tokenisation: image ``[3, H, W]`` in 0..1, text, label (class index;
    1 for a matched retrieval pair), and the scene's objects for synthetic data."""

    image: torch.Tensor
    text: str
    label: int
    objects: tuple[SceneObject, ...] | None = None


@dataclass(frozen=True)
class _SyntheticSource:
    task: str
    n: int
    seed: int
    split: str
    image: int
    objects: tuple[int, int]
    texture: bool
    jitter: bool = True
    grid: int = GRID
    questions: str = "yesno"

    def __len__(self) -> int:
        return self.n

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS.index(self.split), *key])

    def record(self, index: int) -> Record:
        rng = self._rng(index)
        for _ in range(100):  # a scene that no question fits (e.g. six of one shape) is redrawn
            scene = generate_scene(rng, self.image, objects=self.objects, texture=self.texture,
                                   jitter=self.jitter, grid=self.grid)
            try:
                if self.task == "vqa":
                    text, answer = vqa_question(rng, scene.objects, self.questions)
                    label = VQA_ANSWERS.index(answer)
                elif self.task == "truefalse":
                    label = (index % 2) ^ int(self._rng(index // 2, 1).integers(2))
                    text = truefalse_statement(rng, scene.objects, bool(label))
                else:
                    text, label = caption(scene.objects), 1
            except ValueError:
                continue
            return Record(torch.from_numpy(scene.image), text, label, scene.objects)
        raise DataError(f"no {self.task} sample fits scenes of {self.objects[0]}-{self.objects[1]} objects")


@dataclass(frozen=True)
class _FolderRow:
    image: str
    text: str
    label: int
    line: int


@dataclass(frozen=True)
class _FolderSource:
    root: str
    rows: tuple[_FolderRow, ...]
    image: int

    def __len__(self) -> int:
        return len(self.rows)

    def record(self, index: int) -> Record:
        row = self.rows[index]
        return Record(_read_image(Path(self.root) / row.image, self.image, row.line), row.text, row.label)


class VLDataset(Dataset):
    """Items ``dict(pixel_values [3,H,W], input_ids [T], attention_mask [T], labels [])``.

    ``num_labels`` is the number of answer classes (2 for ``truefalse``; 2 for ``retrieval``,
    whose items are matched pairs with label 1, for an image-text matching head), ``answers``
    names them (``None`` where they have no names), ``max_text_len`` bounds ``T``.
    """

    def __init__(self, source: _SyntheticSource | _FolderSource, *, task: str, tokenizer: WordTokenizer,
                 answers: list[str] | None, num_labels: int, max_text_len: int, spec: DataSpec):
        self.source = source
        self.task = task
        self.tokenizer = tokenizer
        self.answers = answers
        self.num_labels = num_labels
        self.max_text_len = max_text_len
        self.spec = spec

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def image_size(self) -> int:
        return self.spec.image

    def __len__(self) -> int:
        return len(self.source)

    def record(self, index: int) -> Record:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        return self.source.record(index % len(self))

    def encode_item(self, image: torch.Tensor, text: str, label: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(self.tokenizer.encode_one(text, self.max_text_len), dtype=torch.long)
        return {"pixel_values": normalize_image(image), "input_ids": ids,
                "attention_mask": torch.ones_like(ids), "labels": torch.tensor(label, dtype=torch.long)}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rec = self.record(int(index))
        return self.encode_item(rec.image, rec.text, rec.label)

    def __repr__(self) -> str:
        return (f"VLDataset({format_data_spec(self.spec)!r}, task={self.task!r}, n={len(self)}, "
                f"num_labels={self.num_labels}, vocab_size={self.vocab_size})")


_MAX_TEXT_LEN = {"vqa": 16, "truefalse": 16, "retrieval": 40}


def _load_synthetic(spec: DataSpec) -> VLDataset:
    lo, hi = spec.extra.get("objects", (2, 5))
    questions = spec.extra.get("questions", "yesno")
    source = _SyntheticSource(spec.task, int(spec.n), spec.seed, spec.split, spec.image,
                              (lo, hi), bool(spec.extra.get("texture", True)), bool(spec.extra.get("jitter", True)),
                              int(spec.extra.get("grid", GRID)), questions)
    if spec.task == "vqa":
        answers, num_labels = list(VQA_ANSWERS), len(VQA_ANSWERS)
    elif spec.task == "truefalse":
        answers, num_labels = ["false", "true"], 2
    else:
        answers, num_labels = None, 2
    max_len = _MAX_TEXT_LEN[spec.task] + (4 * (hi - 5) if spec.task == "retrieval" and hi > 5 else 0)
    return VLDataset(source, task=spec.task, tokenizer=WordTokenizer(_task_words(spec.task, questions)),
                     answers=answers, num_labels=num_labels, max_text_len=max_len, spec=spec)


def _read_image(path: Path, size: int, line: int) -> torch.Tensor:
    where = f"{path} (data.jsonl line {line})"
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {where}: {exc}") from None
    if array.ndim != 3 or 3 not in (array.shape[0], array.shape[-1]):
        raise DataError(f"image {where} has shape {tuple(array.shape)}; expected [H, W, 3] or [3, H, W]")
    chw = np.moveaxis(array, -1, 0) if array.shape[-1] == 3 else array
    image = torch.from_numpy(np.ascontiguousarray(chw))
    image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    if tuple(image.shape[1:]) != (size, size):
        image = torch.nn.functional.interpolate(image[None], size=(size, size), mode="bilinear",
                                                align_corners=False, antialias=True)[0]
    return image.clamp(0.0, 1.0)


def _read_folder_rows(root: Path) -> list[dict]:
    data = root / "data.jsonl"
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    if not data.is_file():
        raise DataError(f"data folder {root} has no data.jsonl")
    rows = []
    with data.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{data}:{number}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{data}:{number}: expected a JSON object, got {type(row).__name__}")
            for key, kind in (("image", str), ("text", str)):
                if not isinstance(row.get(key), kind):
                    raise DataError(f'{data}:{number}: needs "{key}" as a string')
            if "label" in row and (isinstance(row["label"], bool) or not isinstance(row["label"], (int, str))):
                raise DataError(f'{data}:{number}: "label" must be an integer or a string, got {row["label"]!r}')
            if "split" in row and row["split"] not in SPLITS:
                raise DataError(f'{data}:{number}: "split" must be one of {", ".join(SPLITS)}, got {row["split"]!r}')
            if not (root / row["image"]).is_file():
                raise DataError(f"{data}:{number}: image file {root / row['image']} does not exist")
            rows.append({**row, "line": number})
    if not rows:
        raise DataError(f"{data} has no lines")
    return rows


def _read_answers(root: Path) -> list[str] | None:
    path = root / "answers.json"
    if not path.is_file():
        return None
    try:
        answers = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg})") from None
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers) or not answers:
        raise DataError(f"{path}: expected a non-empty JSON list of strings")
    if len(set(answers)) != len(answers):
        raise DataError(f"{path}: answers repeat")
    return answers


def _folder_task(rows: list[dict], answers: list[str] | None, declared: str, root: Path) -> str:
    labelled = [("label" in r) for r in rows]
    if any(labelled) and not all(labelled):
        line = rows[labelled.index(False)]["line"]
        raise DataError(f"{root / 'data.jsonl'}:{line}: has no \"label\" while other lines do")
    if declared != "auto":
        if declared != "retrieval" and not all(labelled):
            raise DataError(f"{root / 'data.jsonl'}: task {declared} needs a \"label\" on every line")
        return declared
    if not any(labelled):
        return "retrieval"
    if answers is None and all(isinstance(r["label"], int) and r["label"] in (0, 1) for r in rows):
        return "truefalse"
    return "vqa"


def _label_index(row: dict, answers: list[str] | None, num_labels: int, data: Path) -> int:
    label = row["label"]
    if isinstance(label, str):
        if answers is None or label not in answers:
            raise DataError(f"{data}:{row['line']}: label {label!r} is not an answer class"
                            + (f" in answers.json" if answers else ""))
        return answers.index(label)
    if not 0 <= label < num_labels:
        raise DataError(f"{data}:{row['line']}: label {label} is out of range 0..{num_labels - 1}")
    return label


def _load_folder(spec: DataSpec) -> VLDataset:
    root = Path(spec.path or "")
    all_rows = _read_folder_rows(root)
    answers = _read_answers(root)
    task = _folder_task(all_rows, answers, spec.task, root)
    data = root / "data.jsonl"
    if task == "retrieval":
        answers, num_labels = None, 2
    elif task == "truefalse":
        answers, num_labels = answers or ["false", "true"], 2
    else:
        if answers is None:
            strings = sorted({r["label"] for r in all_rows if isinstance(r["label"], str)})
            answers = strings or None
        ints = [r["label"] for r in all_rows if isinstance(r["label"], int)]
        num_labels = len(answers) if answers else max(ints) + 1
    if any("split" in r for r in all_rows):
        rows = [r for r in all_rows if r.get("split") == spec.split]
    else:
        rows = all_rows
    if spec.n is not None:
        rows = rows[: spec.n]
    if not rows:
        raise DataError(f"{data} has no lines for split {spec.split!r}")
    parsed = tuple(_FolderRow(r["image"], r["text"], 1 if task == "retrieval" else
                              _label_index(r, answers, num_labels, data), r["line"]) for r in rows)
    tokenizer = WordTokenizer.from_texts(r["text"] for r in all_rows)
    max_len = max(len(tokenizer.encode_one(r["text"])) for r in all_rows)
    return VLDataset(_FolderSource(str(root), parsed, spec.image), task=task, tokenizer=tokenizer,
                     answers=answers, num_labels=num_labels, max_text_len=max_len,
                     spec=replace(spec, task=task))


def load_dataset(spec: str | DataSpec, split: str | None = None) -> VLDataset:
    """The dataset a spec names; ``split`` (``train``/``val``/``test``) overrides the spec's."""
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    if split is not None:
        spec = replace(spec, split=_split_option(split))
    if spec.source == "folder":
        return _load_folder(spec)
    if spec.task not in TASKS:
        raise DataError(f"unknown synthetic task {spec.task!r}; valid tasks: {', '.join(TASKS)}")
    return _load_synthetic(spec)


# ----------------------------------------------------------------------------- ITM pairs


class _ITMPairs(Dataset):
    """Item ``2i`` is pair ``i`` of a retrieval dataset (label 1); item ``2i+1`` is the same image
    with a mismatched caption (label 0)."""

    task = "itm"
    num_labels = 2
    answers = ["no", "yes"]

    def __init__(self, base: VLDataset, seed: int, hard: bool):
        self.base = base
        self.seed = seed
        self.hard = hard
        self.tokenizer = base.tokenizer
        self.max_text_len = base.max_text_len

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    def __len__(self) -> int:
        return 2 * len(self.base)

    def negative_text(self, index: int) -> str:
        rec = self.base.record(index)
        rng = np.random.default_rng([self.seed, index, 2])
        if self.hard and rec.objects is not None:
            return negative_caption(rng, rec.objects)
        n = len(self.base)
        candidates = [int(j) for j in rng.choice(n, size=min(n, 16), replace=False) if int(j) != index]
        texts = [self.base.record(j).text for j in candidates]
        texts = [t for t in texts if t != rec.text] or ["[UNK]"]
        if not self.hard:
            return texts[0]
        words = set(self.tokenizer.tokenize(rec.text))
        return max(texts, key=lambda t: len(words & set(self.tokenizer.tokenize(t))))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pair, negative = divmod(int(index), 2)
        rec = self.base.record(pair)
        text = self.negative_text(pair) if negative else rec.text
        return self.base.encode_item(rec.image, text, 0 if negative else 1)


def itm_pairs(dataset: VLDataset, seed: int = 0, hard: bool = True) -> Dataset:
    """Image-text matching pairs from a retrieval dataset: matched (label 1) and mismatched
    (label 0) in turn. ``hard`` negatives describe the same scene with one attribute changed or
    two objects' attributes swapped (folder data: the most word-overlapping other caption)."""
    if dataset.task != "retrieval":
        raise DataError(f"itm_pairs needs a retrieval dataset, got task {dataset.task!r}")
    return _ITMPairs(dataset, seed, hard)


# ----------------------------------------------------------------------------- batching, metrics


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack items; ``input_ids`` / ``attention_mask`` are right-padded with 0 to the batch max."""
    if not items:
        raise ValueError("collate needs at least one item")
    out: dict[str, torch.Tensor] = {}
    for key in items[0]:
        values = [torch.as_tensor(item[key]) for item in items]
        if key in ("input_ids", "attention_mask", "token_type_ids"):
            width = max(v.shape[-1] for v in values)
            out[key] = torch.stack([torch.nn.functional.pad(v, (0, width - v.shape[-1])) for v in values])
        else:
            out[key] = torch.stack(values)
    return out


def recall_at_k(sim: torch.Tensor, k: int = 1, targets: torch.Tensor | None = None) -> float:
    """Share of rows (queries) whose target column is among the ``k`` highest scores.
    ``targets`` defaults to the diagonal (row ``i`` matches column ``i``)."""
    sim = torch.as_tensor(sim)
    if sim.ndim != 2:
        raise ValueError(f"similarity matrix must be 2-D [queries, candidates], got shape {tuple(sim.shape)}")
    if targets is None:
        if sim.shape[0] > sim.shape[1]:
            raise ValueError(f"diagonal targets need rows <= columns, got shape {tuple(sim.shape)}")
        targets = torch.arange(sim.shape[0])
    targets = torch.as_tensor(targets).reshape(-1).to(sim.device)
    if targets.numel() != sim.shape[0]:
        raise ValueError(f"{targets.numel()} targets for {sim.shape[0]} similarity rows")
    top = sim.topk(min(k, sim.shape[1]), dim=1).indices
    return int((top == targets[:, None]).any(dim=1).sum()) / sim.shape[0]


def metric(task: str, logits: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[str, float]:
    """``("accuracy", v)`` for ``vqa`` / ``truefalse`` logits ``[N, C]`` (or ``[N]`` scores for a
    binary task, positive = 1); ``("itm_accuracy", v)`` for ``itm``, the same on matched and
    mismatched image-caption pairs; ``("recall@1", v)`` for ``retrieval`` given an
    image-by-caption similarity matrix, with ``labels`` the matching caption per image
    (default: the diagonal)."""
    logits = torch.as_tensor(logits).detach()
    if task == "retrieval":
        return "recall@1", recall_at_k(logits, 1, labels)
    if task not in ("vqa", "truefalse", "itm"):
        raise ValueError(f"unknown task {task!r}; expected one of vqa, truefalse, retrieval, itm")
    if labels is None:
        raise ValueError(f"task {task!r} needs labels")
    labels = torch.as_tensor(labels).detach().reshape(-1).to(logits.device)
    if logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1):
        pred = (logits.reshape(-1) > 0).long()
    elif logits.ndim == 2:
        pred = logits.argmax(dim=1)
    else:
        raise ValueError(f"logits must be [N] or [N, C], got shape {tuple(logits.shape)}")
    if pred.numel() != labels.numel():
        raise ValueError(f"{pred.numel()} predictions for {labels.numel()} labels")
    if labels.numel() == 0:
        raise ValueError("metric needs at least one sample")
    name = "itm_accuracy" if task == "itm" else "accuracy"
    return name, int((pred == labels).sum()) / labels.numel()
