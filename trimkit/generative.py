"""Generative tasks for decoder VLMs: answers as text, left-padded batches, exact match from greedy
generation.

A decoder VLM (LLaVA-style, task kind ``lm``) answers a question by generating tokens. An item of a
:class:`GenerativeItems` data set is one row of token ids::

    prefix (the model's first id and image placeholders, as its input maker lays them out)
    + question words + answer words + end-of-sequence

with the answer's length (answer words plus the end-of-sequence token) as ``labels``. The data's
words become ids of the model's vocabulary through :class:`AnswerLayout` (ids the model does not
reserve; the vocabulary is grown where it is too small). :func:`generative_batch` turns a collated
(right-padded) batch into left-padded model inputs, as generation uses them, with ``position_ids``
counted over the real tokens and token labels that are -100 everywhere but on the answer tokens and
the end-of-sequence token. :func:`prompt_batch` cuts the answers off again for generation, and
:func:`exact_match` compares what :func:`generate_answers` produced with them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from trimkit.data import WordTokenizer, normalize_image
from trimkit.errors import DataError

__all__ = ["IGNORE_INDEX", "AnswerLayout", "data_words", "free_ids", "GenerativeItems", "left_pad",
           "generative_batch", "prompt_batch", "exact_match", "generate_answers"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class AnswerLayout:
    """How a data set's words become a decoder's token ids.

    prefix: ids every row starts with (first id and image placeholders); token_ids: data word index
    -> model id (the tokenizer's ``[PAD]``, ``[CLS]``, ``[SEP]`` map to `pad_id`, the first id and
    `eos_id`); eos_id: the end of an answer; pad_id: left padding.
    """

    prefix: tuple[int, ...]
    token_ids: tuple[int, ...]
    eos_id: int
    pad_id: int

    def ids(self, words: Sequence[int]) -> list[int]:
        return [self.token_ids[w] for w in words]


def data_words(data) -> list[str]:
    """The data's words in tokenizer order, then the words of its answers the tokenizer lacks."""
    words = list(data.tokenizer.id_to_word)
    seen = set(words)
    for answer in getattr(data, "answers", None) or ():
        for word in WordTokenizer.tokenize(answer):
            if word not in seen:
                seen.add(word)
                words.append(word)
    return words


def free_ids(vocab: int, reserved: set[int], count: int) -> list[int]:
    """The first `count` ids below `vocab` not in `reserved` (fewer when there are not enough)."""
    out = []
    for i in range(vocab):
        if len(out) == count:
            break
        if i not in reserved:
            out.append(i)
    return out


class GenerativeItems(Dataset):
    """A question-answer data set (``vqa``, ``truefalse``) as decoder rows (see the module docstring).

    Items: ``pixel_values [3, H, W]``, ``input_ids`` and ``attention_mask [T]`` (no padding) and
    ``labels`` (0-d: how many tokens at the end of the row are the answer, end-of-sequence included).
    """

    def __init__(self, base, layout: AnswerLayout):
        if base.answers is None:
            raise DataError(f"{base.task} data has no answer words; decoders are trained on vqa or truefalse data")
        self.base, self.layout = base, layout
        self.task, self.spec, self.answers = base.task, base.spec, base.answers
        self.tokenizer, self.num_labels = base.tokenizer, base.num_labels
        self.max_text_len = base.max_text_len
        self._index = {w: i for i, w in enumerate(data_words(base))}

    @property
    def vocab_size(self) -> int:
        return len(self._index)

    def __len__(self) -> int:
        return len(self.base)

    def answer_ids(self, label: int) -> list[int]:
        """The model ids of answer `label`'s words followed by the end-of-sequence id."""
        words = WordTokenizer.tokenize(self.answers[label])
        return self.layout.ids([self._index[w] for w in words]) + [self.layout.eos_id]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rec = self.base.record(int(index))
        question = self.tokenizer.encode_one(rec.text, self.max_text_len)[1:-1]
        answer = self.answer_ids(rec.label)
        ids = torch.tensor([*self.layout.prefix, *self.layout.ids(question), *answer], dtype=torch.long)
        return {"pixel_values": normalize_image(rec.image), "input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor(len(answer), dtype=torch.long)}

    def __repr__(self) -> str:
        return f"GenerativeItems({self.base!r}, prefix of {len(self.layout.prefix)} ids)"


def left_pad(ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, T]`` ids and mask -> left-padded (each row's real tokens moved to the end)."""
    width = ids.shape[1]
    shift = width - mask.long().sum(1, keepdim=True)
    index = (torch.arange(width, device=ids.device)[None, :] - shift) % width
    mask = mask.gather(1, index)
    ids = ids.gather(1, index).masked_fill(mask == 0, pad_id)
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as generation counts them: over real tokens, 0 on padding."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def generative_batch(keys: dict[str, str], batch: dict[str, torch.Tensor],
                     pad_id: int) -> tuple[dict[str, Any], torch.Tensor]:
    """``(model inputs, token labels)`` of a collated batch of :class:`GenerativeItems` rows.

    keys: data key -> model argument. The rows are left-padded; ``labels [B, T]`` hold the answer
    tokens (end-of-sequence included) and -100 elsewhere; ``position_ids`` skip the padding."""
    ids, mask = left_pad(batch["input_ids"], batch["attention_mask"], pad_id)
    width = ids.shape[1]
    answer = batch["labels"].reshape(-1, 1).to(ids.device)
    on_answer = torch.arange(width, device=ids.device)[None, :] >= width - answer
    labels = ids.masked_fill(~on_answer, IGNORE_INDEX)
    values = {"input_ids": ids, "attention_mask": mask, "pixel_values": batch["pixel_values"]}
    inputs = {keys[k]: v for k, v in values.items() if k in keys}
    inputs["position_ids"] = _positions(mask)
    return inputs, labels


def prompt_batch(inputs: dict[str, Any], labels: torch.Tensor, pad_id: int,
                 ids_key: str = "input_ids", mask_key: str = "attention_mask") -> tuple[dict, list[list[int]]]:
    """The prompts of a :func:`generative_batch` (answers cut off, left-padded again, no
    ``position_ids``) and each row's answer ids (end-of-sequence included)."""
    ids, mask = inputs[ids_key], inputs[mask_key]
    on_answer = labels != IGNORE_INDEX
    answers = [ids[r][on_answer[r]].tolist() for r in range(ids.shape[0])]
    prompt_mask = mask.masked_fill(on_answer, 0)
    width = int(prompt_mask.sum(1).max())
    ids, prompt_mask = left_pad(*_right_aligned(ids, prompt_mask), pad_id)
    out = {k: v for k, v in inputs.items() if k not in (ids_key, mask_key, "position_ids")}
    out[ids_key], out[mask_key] = ids[:, -width:].contiguous(), prompt_mask[:, -width:].contiguous()
    return out, answers


def _right_aligned(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose real tokens (`mask`) are contiguous, moved to the start (right padding)."""
    width = ids.shape[1]
    first = torch.where(mask.bool().any(1), mask.long().argmax(1), torch.zeros_like(mask[:, 0]))
    index = (torch.arange(width, device=ids.device)[None, :] + first[:, None]) % width
    return ids.gather(1, index), mask.gather(1, index)


def exact_match(generated: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], eos_id: int) -> list[bool]:
    """Per row: the generated ids up to the first `eos_id` equal the answer's ids up to its first one
    (a generation that never ends within its budget matches nothing)."""
    if len(generated) != len(answers):
        raise DataError(f"{len(generated)} generations for {len(answers)} answers")

    def cut(row: Sequence[int]) -> tuple[tuple[int, ...], bool]:
        row = [int(t) for t in row]
        return (tuple(row[:row.index(eos_id)]), True) if eos_id in row else (tuple(row), False)

    out = []
    for gen, ref in zip(generated, answers):
        (g, ended), (a, _) = cut(gen), cut(ref)
        out.append(ended and g == a)
    return out


def generate_answers(model: nn.Module, prompts: dict[str, Any], max_new_tokens: int, eos_id: int,
                     pad_id: int, ids_key: str = "input_ids") -> list[list[int]]:
    """Greedy generation (``do_sample=False``, KV cache on) of at most `max_new_tokens` per row; the new ids."""
    with torch.no_grad():
        out = model.generate(**prompts, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id,
                             pad_token_id=pad_id, use_cache=True)
    start = prompts[ids_key].shape[1]
    return [row[start:].tolist() for row in out]
