"""Fitting a backbone to a data set: heads, vocabulary, image size and the batch -> model inputs map.

A data set from :mod:`trimkit.data` yields ``pixel_values``, ``input_ids``, ``attention_mask`` and
``labels``; models want their own argument names, extra inputs (ViLT's ``pixel_mask``, BLIP-VQA's
``decoder_input_ids``), a head with as many classes as the data has answers and a vocabulary that
covers the data's words. :func:`adapt` makes those changes once (in place, before any pass) and
returns a :class:`Binding`, a JSON-friendly record that :func:`model_batch` uses to turn every data
batch into ``(inputs, labels)``. The binding is saved with a trained folder, so evaluation feeds
the model exactly as training did.

Rules, by task kind of the backbone's adapter:

* ``classification`` with ``num_labels`` equal to the model's vocabulary and a decoder
  (BLIP-VQA): answer ``k`` is the token ``label_ids[k]``, free ids above the data's vocabulary;
* ``classification`` / ``features``: a Hugging Face head is resized to the data's number of
  answers (``config.num_labels``), a plain PyTorch head must already have at least that many;
* ``matching`` (image-text matching): ``truefalse`` labels are the match labels; ``retrieval``
  data becomes matched and mismatched pairs (:func:`trimkit.data.itm_pairs`);
* ``contrastive``: ``retrieval`` data, no labels (the pairs on the diagonal match);
* ``lm`` (decoder VLMs): ``vqa`` / ``truefalse`` answers become text (:mod:`trimkit.generative`):
  each row is the model's image placeholders, the question and the answer words plus an
  end-of-sequence token, left-padded; the data's words take ids the model does not reserve (the
  vocabulary grows where there are too few) and the labels are the answer tokens.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from trimkit.backbones.families import family_by_architecture
from trimkit.data import format_data_spec, itm_pairs, load_dataset, metric, parse_data_spec
from trimkit.errors import DataError
from trimkit.generative import AnswerLayout, GenerativeItems, data_words, free_ids, generative_batch

__all__ = ["Binding", "adapt", "refreshed", "binding_for", "model_batch", "resolve_data", "task_dataset", "metric_of",
           "bound_task", "check_task"]

_DATA_KEYS = ("pixel_values", "input_ids", "attention_mask")
_SPECIAL_IDS = (0, 1, 2, 3)


@dataclass(frozen=True)
class Binding:
    """How a data batch feeds a model (JSON-friendly; see :func:`model_batch`).

    keys: data key -> model argument (data keys missing here are dropped).
    constants: model argument -> token ids repeated for every row (BLIP-VQA ``decoder_input_ids``).
    flags: model argument -> a constant non-tensor value (``interpolate_pos_encoding``).
    pixel_mask: model argument of an all-ones pixel mask ``[B, H, W]`` ("" for none).
    max_text_len: longer texts are cut (keeping their last token).
    label_ids: answer index -> logit column (a decoder's answer token); empty = identity.
    metric_task: the task name of :func:`trimkit.data.metric` (``vqa``, ``truefalse``, ``itm``,
      ``retrieval``).
    pairs: the data set is turned into image-text matching pairs.
    prefix / token_ids / eos_id / pad_id: a decoder's answer layout (:class:`AnswerLayout`; empty
      `token_ids` for every other task).
    """

    keys: tuple[tuple[str, str], ...]
    constants: tuple[tuple[str, tuple[int, ...]], ...] = ()
    flags: tuple[tuple[str, bool], ...] = ()
    pixel_mask: str = ""
    max_text_len: int | None = None
    label_ids: tuple[int, ...] = ()
    metric_task: str = "vqa"
    pairs: bool = False
    prefix: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()
    eos_id: int = -1
    pad_id: int = 0

    @property
    def generative(self) -> bool:
        """The model answers by generating text (a decoder VLM)."""
        return bool(self.token_ids)

    @property
    def layout(self) -> AnswerLayout:
        return AnswerLayout(self.prefix, self.token_ids, self.eos_id, self.pad_id)

    def to_dict(self) -> dict:
        data = {"keys": [list(k) for k in self.keys], "constants": [[k, list(v)] for k, v in self.constants],
                "flags": [list(f) for f in self.flags], "pixel_mask": self.pixel_mask,
                "max_text_len": self.max_text_len, "label_ids": list(self.label_ids),
                "metric_task": self.metric_task, "pairs": self.pairs}
        if self.generative:
            data["generative"] = {"prefix": list(self.prefix), "token_ids": list(self.token_ids),
                                  "eos_id": self.eos_id, "pad_id": self.pad_id}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Binding":
        try:
            gen = data.get("generative") or {}
            return cls(prefix=tuple(int(i) for i in gen.get("prefix", [])),
                       token_ids=tuple(int(i) for i in gen.get("token_ids", [])),
                       eos_id=int(gen.get("eos_id", -1)), pad_id=int(gen.get("pad_id", 0)),
                       keys=tuple((str(a), str(b)) for a, b in data["keys"]),
                       constants=tuple((str(k), tuple(int(i) for i in v)) for k, v in data.get("constants", [])),
                       flags=tuple((str(k), bool(v)) for k, v in data.get("flags", [])),
                       pixel_mask=str(data.get("pixel_mask", "")),
                       max_text_len=data.get("max_text_len"),
                       label_ids=tuple(int(i) for i in data.get("label_ids", [])),
                       metric_task=str(data.get("metric_task", "vqa")), pairs=bool(data.get("pairs", False)))
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"cannot read a saved input binding ({err}): {dict(data)!r}") from None


# ----------------------------------------------------------------------------------------------
# Data spec: the model's image size unless the spec names one
# ----------------------------------------------------------------------------------------------
def _native_image_size(backbone) -> int | None:
    size = (backbone.hints or {}).get("image_size", {})
    if isinstance(size, Mapping) and isinstance(size.get("native"), int):
        return size["native"]
    for value in backbone.make_inputs(1).values():
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point():
            return int(value.shape[-1])
    return None


def resolve_data(spec: str, backbone, *, split: str | None = None):
    """The `DataSpec` of `spec` with the model's native image size where the spec names none,
    and `split` where the spec names none."""
    parsed = parse_data_spec(spec)
    query = spec.partition("?")[2]
    names = {part.partition("=")[0] for part in query.split("&") if part}
    changes: dict[str, Any] = {}
    if "image" not in names:
        native = _native_image_size(backbone)
        if native is not None:
            changes["image"] = max(native, 32) if parsed.source == "synthetic" else native
    if split is not None and "split" not in names:
        changes["split"] = split
    return dataclasses.replace(parsed, **changes) if changes else parsed


def bound_task(binding: Binding) -> str:
    """The data task a binding was made for (``itm`` pairs are made from ``retrieval`` data)."""
    return "retrieval" if binding.metric_task in ("itm", "retrieval") else binding.metric_task


def check_task(binding: Binding, data) -> None:
    """`DataError` naming both tasks when `data` is not of the task the model was fitted to."""
    expected = bound_task(binding)
    if data.task != expected:
        raise DataError(f"the model was fitted to {expected} data, but {format_data_spec(data.spec)} is "
                        f"{data.task} data; evaluate it on {expected} data (e.g. synthetic:{expected})")


def task_dataset(spec, binding: Binding):
    """The dataset of `spec` as the model sees it (ITM pairs for matching models on retrieval);
    `DataError` when its task is not the one `binding` was made for."""
    data = load_dataset(spec)
    check_task(binding, data)
    if binding.generative:
        return GenerativeItems(data, binding.layout)
    return itm_pairs(data) if binding.pairs else data


# ----------------------------------------------------------------------------------------------
# Adapting the model
# ----------------------------------------------------------------------------------------------
def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _example(backbone) -> dict:
    return backbone.make_inputs(1)


def _role_keys(backbone) -> dict[str, str]:
    """data key -> model argument, from names first, then from the example inputs' shapes."""
    example = _example(backbone)
    keys = {k: k for k in _DATA_KEYS if k in example}
    if "pixel_values" not in keys:
        images = [k for k, v in example.items() if isinstance(v, torch.Tensor) and v.dim() == 4
                  and v.is_floating_point()]
        if len(images) == 1:
            keys["pixel_values"] = images[0]
    if "input_ids" not in keys:
        ids = [k for k, v in example.items() if isinstance(v, torch.Tensor) and v.dim() == 2
               and not v.is_floating_point() and k not in keys.values()]
        if len(ids) == 1:
            keys["input_ids"] = ids[0]
    if "pixel_values" not in keys or "input_ids" not in keys:
        raise DataError(f"cannot tell which inputs of {backbone.name!r} take the image and the text "
                        f"(its example inputs: {', '.join(sorted(example))})")
    return keys


def _text_limit(backbone) -> int | None:
    limit = (backbone.hints or {}).get("text_len", {})
    return limit.get("max") if isinstance(limit, Mapping) and isinstance(limit.get("max"), int) else None


def _vocab_size(model: nn.Module) -> int | None:
    try:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:
        emb = None
    if isinstance(emb, nn.Embedding):
        return emb.num_embeddings
    return None


def _fit_vocabulary(backbone, vocab: int) -> dict:
    model = backbone.model
    have = _vocab_size(model)
    if have is None or have >= vocab:
        return {}
    if not _is_hf(model):
        raise DataError(f"the data needs a vocabulary of {vocab} tokens; {backbone.name!r} has {have} "
                        "(only Hugging Face models are resized)")
    model.resize_token_embeddings(vocab)
    return {"vocab_size": [have, vocab]}


def _head(model: nn.Module, classes: int) -> tuple[str, nn.Linear] | None:
    """The last Linear with `classes` outputs (the classification head)."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == classes:
            found = (name, module)
    return found


def _resize_head(backbone, num_labels: int, answers) -> dict:
    model, have = backbone.model, backbone.task.num_labels
    if have == num_labels:
        return {}
    if not _is_hf(model):
        if have is None:
            with torch.no_grad():
                logits = backbone.task.logits(model(**backbone.make_inputs(1)))
            have = int(logits.shape[-1]) if logits.dim() == 2 else None
        if have is not None and have >= num_labels:
            return {}
        raise DataError(f"the data has {num_labels} answer classes; {backbone.name!r} has {have} and only "
                        "Hugging Face heads are resized")
    head = _head(model, have) if have else None
    if head is None:
        raise DataError(f"cannot find the {have}-class head of {backbone.name!r} to fit {num_labels} classes")
    name, old = head
    new = nn.Linear(old.in_features, num_labels, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    model.set_submodule(name, new)
    model.config.num_labels = num_labels
    if answers:
        model.config.id2label = {i: a for i, a in enumerate(answers)}
        model.config.label2id = {a: i for i, a in enumerate(answers)}
    return {"num_labels": [have, num_labels], "head": name}


def _decoder_label_ids(backbone, data_vocab: int, num_labels: int) -> tuple[int, ...]:
    vocab = backbone.task.num_labels
    example = _example(backbone)
    reserved = set(_SPECIAL_IDS)
    for value in example.values():
        if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dim() == 2:
            reserved |= {int(value[0, 0]), int(value[0, -1])}
    free = [i for i in range(data_vocab, vocab) if i not in reserved]
    if len(free) < num_labels:
        raise DataError(f"{backbone.name!r} has {vocab} tokens: too few free ids for {num_labels} answers "
                        f"above the data's {data_vocab} words")
    return tuple(free[:num_labels])


def _constants(backbone, keys: dict[str, str]) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], str]:
    example = _example(backbone)
    used = set(keys.values())
    constants, pixel_mask = [], ""
    for key, value in example.items():
        if key in used or not isinstance(value, torch.Tensor):
            continue
        if value.dim() == 3 and not value.is_floating_point():
            pixel_mask = key
        elif value.dim() == 2 and not value.is_floating_point():
            constants.append((key, tuple(int(i) for i in value[0])))
    return tuple(constants), pixel_mask


def _flags(backbone, image: int) -> tuple[tuple[str, bool], ...]:
    example = backbone.make_inputs(1, image_size=image) if image else _example(backbone)
    return tuple((k, bool(v)) for k, v in example.items() if isinstance(v, bool))


def _metric_task(kind: str, data_task: str, name: str) -> tuple[str, bool]:
    if kind == "contrastive":
        if data_task != "retrieval":
            raise DataError(f"{name!r} is a contrastive model: train and evaluate it on synthetic:retrieval, "
                            f"not {data_task}")
        return "retrieval", False
    if kind == "matching":
        if data_task == "retrieval":
            return "itm", True
        if data_task == "truefalse":
            return "truefalse", False
        raise DataError(f"{name!r} is an image-text matching model: use synthetic:truefalse or "
                        f"synthetic:retrieval, not {data_task}")
    if kind in ("classification", "features"):
        if data_task == "retrieval":
            raise DataError(f"{name!r} answers with classes: use synthetic:vqa or synthetic:truefalse, "
                            "not retrieval")
        return data_task, False
    if kind == "lm":
        if data_task not in ("vqa", "truefalse"):
            raise DataError(f"{name!r} is a decoder that answers in text: use synthetic:vqa or synthetic:truefalse, "
                            f"not {data_task}")
        return data_task, False
    raise DataError(f"{name!r} has a {kind!r} task head; trimkit trains classification, matching, contrastive "
                    "and language-model (decoder) heads")


def _first_int(value) -> int | None:
    value = value[0] if isinstance(value, (list, tuple)) and value else value
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _decoder_ids(backbone, ids_key: str) -> tuple[tuple[int, ...], int, int]:
    """``(prefix, eos, pad)``: the example row up to its last image placeholder, and the text config's
    end-of-sequence and padding ids."""
    model, hints = backbone.model, backbone.hints or {}
    image = hints.get("image_token_id")
    row = [int(i) for i in _example(backbone)[ids_key][0]]
    if not isinstance(image, int) or image not in row:
        raise DataError(f"cannot tell where {backbone.name!r} takes its image placeholders (no image_token_id "
                        "hint found in its example inputs)")
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    eos = _first_int(getattr(text, "eos_token_id", None))
    if eos is None:
        eos = _first_int(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    if eos is None:
        raise DataError(f"{backbone.name!r} names no end-of-sequence token; a decoder's answers need one")
    pad = _first_int(getattr(text, "pad_token_id", None))
    return tuple(row[: len(row) - row[::-1].index(image)]), eos, eos if pad is None else pad


def _answer_layout(backbone, data, ids_key: str, vocab: int | None) -> tuple[AnswerLayout, int]:
    """The decoder's answer layout for `data` within a vocabulary of `vocab` ids, and the vocabulary
    size it needs (larger than `vocab` when too few ids are free)."""
    prefix, eos, pad = _decoder_ids(backbone, ids_key)
    reserved = {*_SPECIAL_IDS, *prefix, eos, pad}
    wanted = len(data_words(data)) - 3  # every word but [PAD], [CLS], [SEP]
    vocab = vocab or 0
    free = free_ids(vocab, reserved, wanted)
    missing = wanted - len(free)
    free += [i for i in range(vocab, vocab + missing + len(reserved)) if i not in reserved][:missing]
    need = max(vocab, max(free, default=-1) + 1)
    return AnswerLayout(prefix, (pad, prefix[0], eos, *free), eos, pad), need


def binding_for(backbone, data) -> Binding:
    """The binding of `backbone` (already adapted) to dataset `data`, without changing the model."""
    kind = backbone.task.kind
    metric_task, pairs = _metric_task(kind, data.task, backbone.name)
    keys = _role_keys(backbone)
    constants, pixel_mask = _constants(backbone, keys)
    label_ids: tuple[int, ...] = ()
    if kind == "classification" and any(k == "decoder_input_ids" or "decoder" in k for k, _ in constants):
        label_ids = _decoder_label_ids(backbone, data.vocab_size, data.num_labels)
    if kind == "lm":
        vocab = _vocab_size(backbone.model)
        layout, need = _answer_layout(backbone, data, keys["input_ids"], vocab)
        if vocab is not None and need > vocab:
            raise DataError(f"{backbone.name!r} has {vocab} tokens: too few free ids for the data's "
                            f"{len(data_words(data)) - 3} words")
        return Binding(keys=tuple(sorted(keys.items())), constants=constants, flags=_flags(backbone, data.spec.image),
                       pixel_mask=pixel_mask, metric_task=metric_task, prefix=layout.prefix,
                       token_ids=layout.token_ids, eos_id=layout.eos_id, pad_id=layout.pad_id)
    return Binding(keys=tuple(sorted(keys.items())), constants=constants,
                   flags=_flags(backbone, data.spec.image), pixel_mask=pixel_mask,
                   max_text_len=_text_limit(backbone), label_ids=label_ids, metric_task=metric_task,
                   pairs=pairs)


def adapt(backbone, data) -> tuple[Binding, dict]:
    """Fit `backbone.model` (in place) to dataset `data`; the binding and what was changed.

    Call it before any pass is applied. Afterwards ``backbone.task`` may be stale: use the
    returned backbone of :func:`refreshed`.
    """
    changes: dict[str, Any] = {}
    kind = backbone.task.kind
    if kind == "lm":
        _metric_task(kind, data.task, backbone.name)
        ids_key = _role_keys(backbone)["input_ids"]
        need = _answer_layout(backbone, data, ids_key, _vocab_size(backbone.model))[1]
        changes.update(_fit_vocabulary(backbone, need))
    else:
        changes.update(_fit_vocabulary(backbone, data.vocab_size))
    probe = binding_for(backbone, data)
    if kind in ("classification", "features") and not probe.label_ids:
        changes.update(_resize_head(backbone, data.num_labels, data.answers))
    return probe, changes


def refreshed(backbone):
    """`backbone` with its task adapter re-read from the (adapted) model's config."""
    if not _is_hf(backbone.model):
        return backbone
    family = family_by_architecture(type(backbone.model).__name__)
    if family is None:
        return backbone
    task = family.task(backbone.model.config)
    hints = dict(backbone.hints)
    if task.num_labels is not None:
        hints["num_labels"] = task.num_labels
    return dataclasses.replace(backbone, task=task, hints=hints)


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------
def _cut_text(t: torch.Tensor, limit: int | None) -> torch.Tensor:
    if limit is None or t.shape[1] <= limit:
        return t
    return torch.cat([t[:, : limit - 1], t[:, -1:]], dim=1)


def model_batch(binding: Binding, batch: Mapping[str, torch.Tensor],
                device: torch.device | None = None) -> tuple[dict, torch.Tensor | None]:
    """``(model inputs, labels)`` of a collated data batch (labels mapped to logit columns; a decoder's
    rows left-padded with token labels, see :func:`trimkit.generative.generative_batch`)."""
    if binding.generative:
        inputs, labels = generative_batch(dict(binding.keys), batch, binding.pad_id)
        inputs.update(binding.flags)
        if device is not None:
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            labels = labels.to(device)
        return inputs, labels
    inputs: dict[str, Any] = {}
    for data_key, model_key in binding.keys:
        value = batch[data_key]
        if data_key in ("input_ids", "attention_mask"):
            value = _cut_text(value, binding.max_text_len)
        inputs[model_key] = value
    pixels = batch["pixel_values"]
    rows = pixels.shape[0]
    if binding.pixel_mask:
        inputs[binding.pixel_mask] = torch.ones(rows, pixels.shape[-2], pixels.shape[-1], dtype=torch.long)
    for key, ids in binding.constants:
        inputs[key] = torch.tensor(ids, dtype=torch.long).expand(rows, -1).clone()
    for key, flag in binding.flags:
        inputs[key] = flag
    labels = batch.get("labels")
    if binding.metric_task == "retrieval":
        labels = None
    elif labels is not None and binding.label_ids:
        labels = torch.tensor(binding.label_ids, dtype=torch.long)[labels.long()]
    if device is not None:
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        labels = labels.to(device) if labels is not None else None
    return inputs, labels


def metric_of(binding: Binding, logits: torch.Tensor, labels: torch.Tensor | None) -> tuple[str, float]:
    """The data set's metric of `logits` (answer columns picked where the answers are tokens)."""
    if binding.label_ids:
        columns = torch.tensor(binding.label_ids, device=logits.device)
        logits = logits.index_select(-1, columns)
        if labels is not None:
            lookup = {c: i for i, c in enumerate(binding.label_ids)}
            labels = torch.tensor([lookup[int(v)] for v in labels.reshape(-1)], dtype=torch.long)
    return metric(binding.metric_task, logits.float(), labels)
