"""Per-question-type accuracy, the blind (text-only) prior, export of bench models, grounding probes.

The ``where`` questions (``synthetic:vqa?questions=where``, :func:`trimkit.data.where_question`)
name one object among distractors. :func:`by_type` scores a model per question type;
:func:`blind_prior` scores the best answer that ignores the image (the majority answer of each
question text, counted on a training split). :func:`export_vilt` writes the Hugging Face ViLT
inside a bench model as a ``save_pretrained`` folder with its answers and data spec;
:func:`export_bench` writes any bench model's state. :func:`grounding_probe` attaches linear
read-outs to a bench model's image tokens (:func:`grounding_targets`: does the token's cell hold
the object the question names, that object's colour and shape), trained beside the task loss.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Sequence

import torch

from trimkit.data import collate, format_data_spec
from trimkit.errors import ConfigError

__all__ = ["question_type", "by_type", "blind_prior", "prior_correct", "export_vilt", "export_bench", "ship",
           "predictions", "DATA_FILE", "round_to_half", "half_state", "referents", "patch_cells", "grounding_targets",
           "ViltGroundingProbe", "StreamGroundingProbe", "grounding_probe"]

DATA_FILE = "trimkit_data.json"


def question_type(text: str) -> str:
    """``exists`` / ``shape`` / ``colour`` / ``size`` for where and attribute questions; ``count``,
    ``relation``, ``direction``, ``closest`` for the others."""
    words = text.split()
    if words[0] == "is":
        return "exists" if words[1] == "there" else "relation"
    if words[0] == "how":
        return "count"
    if "closest" in words:
        return "closest"
    if {"left", "right", "above", "below"} & set(words):
        return "direction"
    return words[1]


def _table(correct: Sequence[bool], kinds: Sequence[str]) -> dict:
    right, total = Counter(), Counter()
    for ok, kind in zip(correct, kinds):
        total[kind] += 1
        right[kind] += bool(ok)
    return {"accuracy": sum(right.values()) / max(1, len(kinds)), "n": len(kinds),
            "by_type": {k: {"accuracy": right[k] / total[k], "n": total[k]} for k in sorted(total)}}


@torch.no_grad()
def predictions(model: torch.nn.Module, dataset, batch_size: int = 128,
                inputs: Callable[[dict], dict] | None = None) -> list[int]:
    """The argmax answer of `model` on every item of `dataset` (a bench model's batch keys)."""
    was = model.training
    model.eval()
    out: list[int] = []
    try:
        for lo in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(lo, min(lo + batch_size, len(dataset)))])
            feed = {k: v for k, v in batch.items() if k != "labels"}
            out += model(**(inputs(feed) if inputs else feed)).logits.argmax(-1).tolist()
    finally:
        model.train(was)
    return out


def by_type(model: torch.nn.Module, dataset, batch_size: int = 128) -> dict:
    """``{"accuracy", "n", "by_type": {type: {"accuracy", "n"}}}`` of `model` on `dataset`."""
    pred = predictions(model, dataset, batch_size)
    records = [dataset.record(i) for i in range(len(dataset))]
    return _table([p == r.label for p, r in zip(pred, records)], [question_type(r.text) for r in records])


def _texts_labels(dataset, n: int | None = None) -> list[tuple[str, int]]:
    count = len(dataset) if n is None else min(n, len(dataset))
    source = getattr(dataset, "source", None)
    if source is not None and hasattr(source, "question"):
        return [source.question(i) for i in range(count)]
    return [(r.text, r.label) for r in (dataset.record(i) for i in range(count))]


def prior_correct(train, evaluate, n_train: int = 20000) -> tuple[list[bool], list[str]]:
    """Per item of `evaluate`: is the text-only prior right (see :func:`blind_prior`), and the
    question type."""
    by_text: dict[str, Counter] = defaultdict(Counter)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for text, label in _texts_labels(train, n_train):
        by_text[text][label] += 1
        by_kind[question_type(text)][label] += 1
    correct, kinds = [], []
    for text, label in _texts_labels(evaluate):
        kind = question_type(text)
        counts = by_text.get(text) or by_kind.get(kind) or Counter({-1: 1})
        correct.append(max(sorted(counts), key=lambda a: counts[a]) == label)
        kinds.append(kind)
    return correct, kinds


def blind_prior(train, evaluate, n_train: int = 20000) -> dict:
    """The text-only prior: each question text answered with its most frequent answer among the
    first `n_train` items of `train` (the question type's majority answer for a text never seen);
    scored on `evaluate` like :func:`by_type`."""
    return _table(*prior_correct(train, evaluate, n_train))


def export_vilt(bench_model: torch.nn.Module, folder: str | Path, dataset=None) -> Path:
    """Write the `ViltForQuestionAnswering` of a bench ViLT to `folder` (``save_pretrained``), its
    answer names as ``id2label`` and, given the `dataset` it was trained on, the data spec and the
    tokenizer's vocabulary in :data:`DATA_FILE`."""
    vilt = getattr(bench_model, "vilt", None)
    if vilt is None:
        raise ConfigError(f"export_vilt needs a bench ViLT model, got {type(bench_model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if dataset is not None and dataset.answers:
        vilt.config.id2label = dict(enumerate(dataset.answers))
        vilt.config.label2id = {a: i for i, a in enumerate(dataset.answers)}
    vilt.config.cls_token_id = dataset.tokenizer.cls_token_id if dataset is not None else None
    vilt.config.sep_token_id = dataset.tokenizer.sep_token_id if dataset is not None else None
    vilt.save_pretrained(folder)
    if dataset is not None:
        info = {"data": format_data_spec(dataset.spec), "answers": dataset.answers,
                "vocab": dataset.tokenizer.id_to_word, "max_text_len": dataset.max_text_len}
        (folder / DATA_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return folder


@torch.no_grad()
def round_to_half(model: torch.nn.Module) -> torch.nn.Module:
    """Round every floating-point parameter and buffer of `model` to float16 precision, in place
    (the weights :func:`export_bench` writes)."""
    for value in model.state_dict().values():
        if value.is_floating_point():
            value.copy_(value.half())
    return model


def half_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state with floating-point tensors in float16 (a loader casts them back)."""
    return {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous()
            for k, v in model.state_dict().items()}


def export_bench(bench_model: torch.nn.Module, folder: str | Path, dataset) -> Path:
    """Write a bench model's state in float16 (``model.safetensors``, see :func:`round_to_half`) to
    `folder` with the data spec, answers and vocabulary of the `dataset` it was trained on in
    :data:`DATA_FILE`; the model is rebuilt from its ``ModelConfig``
    (:func:`trimkit.bench.models.build_model`) and loads the weights as float32."""
    from safetensors.torch import save_file

    from trimkit.backbones.trained import WEIGHTS_FILE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(half_state(bench_model), str(folder / WEIGHTS_FILE))
    info = {"data": format_data_spec(dataset.spec), "answers": dataset.answers,
            "vocab": dataset.tokenizer.id_to_word, "max_text_len": dataset.max_text_len}
    (folder / DATA_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return folder


def ship(run_dir: str | Path, target: str | Path, command: str) -> dict:
    """Copy a training run of ``benchmarks/train_where_base.py`` (`run_dir` holding ``model/`` and
    ``record.json``) into a shipped-model folder `target`: ``config.json`` (a Hugging Face model;
    none for a bench model written by :func:`export_bench`, whose ``trained.json`` then says
    ``"format": "bench"``), ``model.safetensors``, ``record.json`` (the training log) and
    ``trained.json`` (data spec, vocabulary, answers, SHA-256 of the weights, the model config,
    accuracies, blind prior and the reproducing `command`)."""
    import shutil

    from trimkit.backbones.trained import BENCH_FORMAT, INFO_FILE, WEIGHTS_FILE, weights_sha256

    run_dir, target = Path(run_dir), Path(target)
    record = json.loads((run_dir / "record.json").read_text(encoding="utf-8"))
    data = json.loads((run_dir / "model" / DATA_FILE).read_text(encoding="utf-8"))
    target.mkdir(parents=True, exist_ok=True)
    bench = not (run_dir / "model" / "config.json").is_file()  # BLIP / BridgeTower: a bench model's state
    for name in (WEIGHTS_FILE,) if bench else ("config.json", WEIGHTS_FILE):
        shutil.copyfile(run_dir / "model" / name, target / name)
    shutil.copyfile(run_dir / "record.json", target / "record.json")
    info = {**({"format": BENCH_FORMAT} if bench else {}), "data": record["spec"], "answers": data["answers"],
            "vocab": data["vocab"], "max_text_len": data["max_text_len"],
            "sha256": {WEIGHTS_FILE: weights_sha256(target / WEIGHTS_FILE)},
            "val": record["val"], "test": record["test"], "blind_prior": record["blind_prior"],
            "model": record["model"], "train": record["train"], "train_seconds": record["train_seconds"],
            "train_cpu_seconds": record["train_cpu_seconds"], "command": command}
    (target / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return info


# ----------------------------------------------------------------------------- grounding targets


def referents(objects, text: str) -> list:
    """The objects a ``where`` question names: the object of the named colour (``shape``
    questions), of the named shape (``colour``), or of both (``exists``; none for a "no")."""
    words = text.split()
    kind = question_type(text)
    if kind == "exists":
        return [o for o in objects if o.colour == words[3] and o.shape == words[4]]
    if kind == "shape":
        return [o for o in objects if o.colour == words[4]]
    if kind == "colour":
        return [o for o in objects if o.shape == words[4]]
    raise ValueError(f"not a where question: {text!r}")


def patch_cells(image: int, patch: int, grid: int) -> torch.Tensor:
    """``[side]``: the grid row (or column) that holds the centre of each patch row (or column)."""
    side = image // patch
    return ((torch.arange(side) + 0.5) * patch * grid / image).long().clamp(max=grid - 1)


def grounding_targets(objects, text: str, image: int, patch: int, grid: int) -> torch.Tensor:
    """``[P, 3]`` long, patches in row-major order: 1 where the patch's grid cell holds an object the
    question names (see `referents`), else 0; then the colour and shape index + 1 of the object in
    the cell (0 where it is empty)."""
    from trimkit.data import COLOURS, SHAPES

    cells = patch_cells(image, patch, grid)
    table = torch.zeros(grid, grid, 3, dtype=torch.long)
    named = {(o.row, o.col) for o in referents(objects, text)}
    for o in objects:
        table[o.row, o.col] = torch.tensor([int((o.row, o.col) in named), list(COLOURS).index(o.colour) + 1,
                                            SHAPES.index(o.shape) + 1])
    side = len(cells)
    return table[cells[:, None], cells[None, :]].reshape(side * side, 3)


class ViltGroundingProbe(torch.nn.Module):
    """Linear read-outs of a ViLT's last-layer image tokens, trained with it: does the token's cell
    hold an object the question names, and that object's colour and shape. ViLT feeds its patches
    in a random order; the probe records the order of every forward (``patch_index``) and reads the
    targets in it. :meth:`remove` restores the model."""

    CLASSES = (2, 7, 5)

    def __init__(self, vilt: torch.nn.Module):
        super().__init__()
        self.heads = torch.nn.Linear(vilt.config.hidden_size, sum(self.CLASSES))
        self._embeddings = vilt.vilt.embeddings
        original = self._embeddings.visual_embed
        self._index: torch.Tensor | None = None
        self._states: torch.Tensor | None = None

        def visual_embed(*args, **kwargs):
            x, mask, (index, size) = original(*args, **kwargs)
            self._index = index
            return x, mask, (index, size)

        self._embeddings.visual_embed = visual_embed
        self._handle = vilt.vilt.layernorm.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self._states = output

    def loss(self, targets: torch.Tensor, side: int) -> torch.Tensor:
        """Mean cross-entropy of the three read-outs; `targets` ``[B, P, 3]`` in row-major order."""
        index, states = self._index, self._states
        if index is None or states is None:
            raise ConfigError("the grounding probe saw no forward")
        patches = index.shape[1]
        image = states[:, -patches:]
        order = (index[..., 0] * side + index[..., 1]).long()
        picked = torch.gather(targets, 1, order[..., None].expand(-1, -1, targets.shape[-1]))
        logits = self.heads(image.float()).split(self.CLASSES, dim=-1)
        self._index = self._states = None
        return sum(torch.nn.functional.cross_entropy(z.flatten(0, 1), picked[..., k].flatten())
                   for k, z in enumerate(logits)) / len(logits)

    def remove(self) -> None:
        self._handle.remove()
        del self._embeddings.visual_embed


def _image_stream(model: torch.nn.Module) -> tuple[torch.nn.Module, str, tuple[int, ...]]:
    """Where a BLIP or BridgeTower bench model's image tokens meet the question last: the module to
    hook, the output field holding ``[B, 1 + P, H]`` (image [CLS] first, patches row-major) and the
    target columns those tokens can carry."""
    family = getattr(getattr(model, "config", None), "family", None)
    if family == "blip":  # the vision encoder never sees the question: colour and shape per cell
        return model.vision_model, "last_hidden_state", (1, 2)
    if family == "bridgetower":  # the cross-modal image stream also knows what the question names
        return model.bridgetower, "image_features", (0, 1, 2)
    raise ConfigError(f"StreamGroundingProbe reads BLIP or BridgeTower bench models, not {family!r}")


class StreamGroundingProbe(torch.nn.Module):
    """Linear read-outs of the image tokens of a BLIP or BridgeTower bench model, trained with it,
    against :func:`grounding_targets`: BLIP's vision encoder output (colour and shape of the
    object in each token's cell), BridgeTower's last cross-modal image layer (also: does the cell
    hold an object the question names). :meth:`remove` restores the model."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        module, self.field, self.columns = _image_stream(model)
        self.classes = tuple(ViltGroundingProbe.CLASSES[k] for k in self.columns)
        self.heads = torch.nn.Linear(model.config.hidden, sum(self.classes))
        self._states: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self._states = getattr(output, self.field)[:, 1:]

    def loss(self, targets: torch.Tensor, side: int) -> torch.Tensor:
        """Mean cross-entropy of the read-outs; `targets` ``[B, P, 3]`` in row-major order."""
        states = self._states
        if states is None or states.shape[1] != side * side or states.shape[:2] != targets.shape[:2]:
            raise ConfigError("the grounding probe did not see the image tokens of this batch")
        logits = self.heads(states.float()).split(self.classes, dim=-1)
        self._states = None
        return sum(torch.nn.functional.cross_entropy(z.flatten(0, 1), targets[..., k].flatten())
                   for k, z in zip(self.columns, logits)) / len(logits)

    def remove(self) -> None:
        self._handle.remove()


def grounding_probe(model: torch.nn.Module) -> torch.nn.Module:
    """The grounding probe of a bench model: :class:`ViltGroundingProbe` for ViLT, else
    :class:`StreamGroundingProbe`."""
    if getattr(model.config, "family", None) == "vilt":
        return ViltGroundingProbe(model.vilt)
    return StreamGroundingProbe(model)
