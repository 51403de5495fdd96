"""Text-answer data for decoder VLMs: rows, left padding, labels, prompts and exact match."""
import pytest
import torch

from trimkit.data import collate, load_dataset
from trimkit.errors import DataError
from trimkit.generative import IGNORE_INDEX, exact_match, free_ids, left_pad, prompt_batch
from trimkit.tasks import Binding, adapt, model_batch, resolve_data, task_dataset

DATA = "synthetic:vqa?n=12"


def _tiny_llava(**changes):
    """llava-tiny's class and config (built directly: quicker than the registry's loader)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from trimkit.backbones import backbone_for_model
    from trimkit.backbones.families import tiny_kwargs

    kw = tiny_kwargs("llava")
    kw["text_config"].update(changes.pop("text", {}))
    kw.update(changes)
    torch.manual_seed(0)
    return backbone_for_model(LlavaForConditionalGeneration(LlavaConfig(**kw)), name="llava-tiny")


@pytest.fixture(scope="module")
def llava():
    backbone = _tiny_llava()
    spec = resolve_data(DATA, backbone)
    binding, changes = adapt(backbone, load_dataset(spec))
    return backbone, binding, changes, task_dataset(spec, binding)


def test_left_pad_moves_each_row_to_the_end():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    mask = (ids != 0).long()
    out, out_mask = left_pad(ids, mask, pad_id=0)
    assert out.tolist() == [[0, 5, 6, 7], [0, 0, 8, 9], [1, 2, 3, 4]]
    assert out_mask.tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]


def test_free_ids_skip_the_reserved_ones():
    assert free_ids(8, {0, 1, 2, 5}, 3) == [3, 4, 6]
    assert free_ids(4, {0}, 9) == [1, 2, 3]


def test_a_row_is_placeholders_question_answer_and_eos(llava):
    backbone, binding, changes, dataset = llava
    image, n_image = backbone.hints["image_token_id"], backbone.hints["image_tokens"]
    text = backbone.model.config.text_config
    assert changes == {}  # 128 ids hold the data's words
    assert binding.generative and binding.eos_id == text.eos_token_id and binding.pad_id == text.pad_token_id
    item = dataset[0]
    ids = item["input_ids"].tolist()
    assert ids[0] == text.bos_token_id and ids[1:1 + n_image] == [image] * n_image
    assert ids.count(image) == n_image and ids[-1] == binding.eos_id
    answer = dataset.answer_ids(dataset.base.record(0).label)
    assert int(item["labels"]) == len(answer) == 2 and ids[-len(answer):] == answer
    question = dataset.tokenizer.encode_one(dataset.base.record(0).text)[1:-1]
    assert ids[1 + n_image:-len(answer)] == [binding.token_ids[w] for w in question]
    words = set(binding.token_ids[3:])
    assert len(words) == len(binding.token_ids) - 3 and not words & {0, 1, 2, image}


def test_a_batch_is_left_padded_with_labels_on_the_answer_only(llava):
    _, binding, _, dataset = llava
    items = [dataset[i] for i in range(6)]
    lengths = [len(it["input_ids"]) for it in items]
    assert len(set(lengths)) > 1  # the batch needs padding
    inputs, labels = model_batch(binding, collate(items))
    width = max(lengths)
    assert inputs["input_ids"].shape == labels.shape == (6, width)
    for r, item in enumerate(items):
        pad = width - lengths[r]
        assert inputs["attention_mask"][r].tolist() == [0] * pad + [1] * lengths[r]
        assert inputs["input_ids"][r, pad:].tolist() == item["input_ids"].tolist()
        assert (inputs["input_ids"][r, :pad] == binding.pad_id).all()
        assert inputs["position_ids"][r].tolist() == [0] * pad + list(range(lengths[r]))
        answer = int(item["labels"])
        assert labels[r, -answer:].tolist() == item["input_ids"][-answer:].tolist()
        assert (labels[r, :-answer] == IGNORE_INDEX).all()


def test_prompts_cut_the_answers_off(llava):
    _, binding, _, dataset = llava
    items = [dataset[i] for i in range(5)]
    prompts, answers = prompt_batch(*model_batch(binding, collate(items)), binding.pad_id)
    assert "position_ids" not in prompts
    for r, item in enumerate(items):
        n = int(item["labels"])
        real = prompts["input_ids"][r][prompts["attention_mask"][r] == 1].tolist()
        assert real == item["input_ids"][:-n].tolist() and answers[r] == item["input_ids"][-n:].tolist()
    assert prompts["attention_mask"][:, -1].all()  # left padding: every prompt ends at the last column


def test_the_binding_round_trips_through_json(llava):
    binding = llava[1]
    assert Binding.from_dict(binding.to_dict()) == binding
    plain = Binding(keys=(("input_ids", "input_ids"),))
    assert "generative" not in plain.to_dict() and not Binding.from_dict(plain.to_dict()).generative


def test_decoders_refuse_retrieval_data(llava):
    backbone = llava[0]
    with pytest.raises(DataError, match="answers in text: use synthetic:vqa"):
        adapt(backbone, load_dataset("synthetic:retrieval?n=4"))


def test_exact_match_reads_up_to_the_first_eos():
    eos = 2
    answers = [[7, eos], [7, eos], [7, 8, eos], [7, eos], [7, eos]]
    generated = [[7, eos, 9], [7, 8, eos], [7, 8, eos], [7, 7], [eos, 7]]
    assert exact_match(generated, answers, eos) == [True, False, True, False, False]
    with pytest.raises(DataError):
        exact_match([[7]], [], eos)


def test_a_small_vocabulary_grows_to_hold_the_words():
    backbone = _tiny_llava(text={"vocab_size": 48}, image_token_index=47)
    data = load_dataset(resolve_data(DATA, backbone))
    binding, changes = adapt(backbone, data)
    grown = changes["vocab_size"]
    assert grown[0] == 48 and grown[1] > 48
    assert backbone.model.get_input_embeddings().num_embeddings == grown[1]
    words = binding.token_ids[3:]
    assert len(set(words)) == len(words) and max(words) == grown[1] - 1 and not set(words) & {0, 1, 2, 3, 47}
    inputs, labels = model_batch(binding, collate([task_dataset(data.spec, binding)[i] for i in range(2)]))
    assert backbone.model(**inputs).logits.shape[-1] == grown[1]
