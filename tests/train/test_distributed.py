import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trimkit.errors import ConfigError
from trimkit.passes import trainable_parameters
from trimkit.train import TrainConfig, train
from trimkit.train.distributed import Group, RowStableRandom, global_mean, shard_rows

WORKER = Path(__file__).with_name("ddp_worker.py")
sys.path.insert(0, str(WORKER.parent))
import ddp_worker  # noqa: E402


def _losses(history):
    return [[round(r[k], 5) for k in ("loss", "task", "distill", "cost", "ratio")] for r in history]


@pytest.mark.slow
def test_two_gloo_processes_train_like_one_and_resume_exactly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    result_file = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(result_file), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(result_file)
    assert two["world"] == 2
    torch.set_num_threads(1)
    one = ddp_worker.run()  # one process, the same global batch of 8
    trimmers = {id(p) for p in trainable_parameters(one.model)}
    names = [n for n, p in one.model.named_parameters() if id(p) in trimmers]
    assert names
    for name, p in one.model.named_parameters():
        limit = 1e-5 if id(p) in trimmers else 1e-4
        assert (p.detach() - two["whole"][name]).abs().max() <= limit, name
    assert _losses(two["history"]) == _losses(one.history)
    for name, p in two["whole"].items():  # the interrupted and resumed run ends where the whole one did
        assert torch.equal(p, two["resumed"][name]), name
    assert [r["loss"] for r in two["resumed_history"]] == [r["loss"] for r in two["history"]]


def test_row_stable_draws_do_not_depend_on_the_rank():
    torch.manual_seed(3)
    whole = torch.rand(6, 5)
    parts = []
    for rank in range(3):
        torch.manual_seed(3)
        with RowStableRandom(2, 2 * rank, 6):
            parts.append(torch.rand((2, 5)))
    assert torch.equal(torch.cat(parts), whole)


def test_row_stable_dropout_keeps_rows_apart():
    x = torch.ones(4, 3, 8)
    torch.manual_seed(0)
    with RowStableRandom(4, 0, 4):
        whole = torch.nn.functional.dropout(x, 0.5, training=True)
    torch.manual_seed(0)
    with RowStableRandom(2, 2, 4):
        part = torch.nn.functional.dropout(x[2:], 0.5, training=True)
    assert torch.equal(part, whole[2:])
    assert set(whole.unique().tolist()) == {0.0, 2.0}
    with RowStableRandom(4, 0, 4):
        assert torch.equal(torch.nn.functional.dropout(x, 0.5, training=False), x)


def test_shards_split_a_global_batch():
    rows = torch.arange(8)
    assert shard_rows(rows, Group(1, 2)).tolist() == [4, 5, 6, 7]
    with pytest.raises(ConfigError, match="not divisible"):
        shard_rows(torch.arange(7), Group(0, 2))


def test_global_mean_is_the_local_mean_for_one_process():
    x = torch.tensor(0.3, requires_grad=True)
    assert global_mean(x, Group()) is x


def test_batch_size_must_divide_among_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        train(ddp_worker.TOY, ddp_worker.DATA, target_ratio=0.6, steps=1, recipe=ddp_worker.RECIPE,
              config=TrainConfig(batch_size=8), progress=False)


def test_dropout_is_found_in_modules_and_hugging_face_configs():
    from types import SimpleNamespace

    from trimkit.train.placement import draws_dropout

    assert draws_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))
    assert not draws_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.0)))
    model = torch.nn.Linear(2, 2)
    model.config = SimpleNamespace(to_dict=lambda: {"text_config": {"attention_dropout": 0.1}, "layers": 2})
    assert draws_dropout(model)
