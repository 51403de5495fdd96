import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trimkit.data import collate
from trimkit.errors import ConfigError, DataError, TrimkitError
from trimkit.profile import count_flops
from trimkit.runtime import runtimes
from trimkit.tasks import model_batch, resolve_data, task_dataset
from trimkit.train import TrainConfig, latest_checkpoint, prepare, train

DATA = "synthetic:vqa?n=48"
FAST = dict(batch_size=8, measure_every=0, calibrate=0)


def _executed_ratio(result, data_spec: str, count: int = 16) -> float:
    """Mean executed FLOPs per sample, trimmed / untrimmed, counted with the profiler one sample at a time."""
    from trimkit.runtime import trimming_off

    spec = resolve_data(data_spec, result.backbone, split="val")
    dataset = task_dataset(spec, result.binding)
    model = result.model.eval()
    trimmed, full = [], []
    for i in range(count):
        inputs, _ = model_batch(result.binding, collate([dataset[i]]))
        trimmed.append(count_flops(model, inputs).flops)
        with trimming_off(model):
            full.append(count_flops(model, inputs).flops)
    return float(np.mean(trimmed) / np.mean(full))


@pytest.mark.slow
def test_training_reaches_the_target_while_the_task_loss_falls(tokens_recipe):
    target = 0.75  # vilt-vqa-tiny has two layers: tokens alone go down to about 0.56
    data = "synthetic:vqa?n=128"
    config = TrainConfig(lr_backbone=2e-3, anneal=0.3, **{**FAST, "calibrate": 128})
    result = train("vilt-vqa-tiny", data, target_ratio=target, steps=50, recipe=tokens_recipe, config=config,
                   progress=False)
    task = [row["task"] for row in result.history]
    assert result.history[0]["ratio"] > 0.95
    assert abs(result.expected_ratio - target) <= 0.05
    assert abs(result.calibrated_ratio - target) <= 0.05
    # executed FLOPs, counted by the profiler on the training items the threshold was calibrated on
    assert abs(_executed_ratio(result, data + "&split=train", count=128) - target) <= 0.05
    assert np.mean(task[-8:]) < np.mean(task[:8]) - 0.1


def _backbone_with_trimmer_bias(recipe, bias: float):
    backbone, *_ = prepare("vilt-vqa-tiny", DATA, recipe=recipe)
    for module in backbone.model.modules():
        if getattr(module, "trimkit_role", None) == "trimmer":
            with torch.no_grad():
                module.score.bias.fill_(bias)
    return backbone


def _spy(model):
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append([rt.enabled for rt in runtimes(m)]))
    return seen


def test_distillation_is_zero_when_trimmers_keep_everything(tokens_recipe):
    backbone = _backbone_with_trimmer_bias(tokens_recipe, 30.0)
    seen = _spy(backbone.model)
    result = train(backbone, DATA, target_ratio=0.5, steps=2, config=TrainConfig(**FAST), progress=False)
    assert result.history[0]["distill"] == pytest.approx(0.0, abs=1e-6)
    assert result.history[0]["ratio"] == pytest.approx(1.0, abs=0.02)
    # one student forward (trimmers on) then one teacher forward (every trimmer off) per step
    assert seen[-4:] == [[True], [False], [True], [False]]


def test_teacher_runs_untrimmed_when_the_student_drops_tokens(tokens_recipe):
    backbone = _backbone_with_trimmer_bias(tokens_recipe, -30.0)
    seen = _spy(backbone.model)
    result = train(backbone, DATA, target_ratio=0.5, steps=1, config=TrainConfig(**FAST), progress=False)
    assert result.history[0]["ratio"] < 0.7
    assert result.history[0]["distill"] > 0.0
    assert seen[-2:] == [[True], [False]]


def test_a_separate_teacher_model(tokens_recipe):
    from trimkit.backbones import load_backbone
    from trimkit.data import load_dataset
    from trimkit.tasks import adapt

    teacher = load_backbone("vilt-vqa-tiny", seed=3)
    adapt(teacher, load_dataset(resolve_data(DATA, teacher)))
    result = train("vilt-vqa-tiny", DATA, target_ratio=0.5, steps=2, recipe=tokens_recipe, teacher=teacher.model,
                   config=TrainConfig(**FAST), progress=False)
    assert result.history[0]["distill"] > 1e-4  # other weights, other outputs
    assert all(p.grad is None for p in teacher.model.parameters())


def _losses(history):
    return [(r["loss"], r["task"], r["distill"], r["cost"], r["ratio"]) for r in history]


@pytest.mark.slow
def test_resume_continues_exactly(tokens_recipe, tmp_path):
    config = TrainConfig(checkpoint_every=2, **FAST)
    whole = train("vilt-vqa-tiny", DATA, target_ratio=0.5, steps=6, recipe=tokens_recipe, config=config,
                  out_dir=tmp_path / "a", progress=False)

    def stop_at_4(step, row):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt, match="after step 4"):
        train("vilt-vqa-tiny", DATA, target_ratio=0.5, steps=6, recipe=tokens_recipe, config=config,
              out_dir=tmp_path / "b", progress=False, callback=stop_at_4)
    assert latest_checkpoint(tmp_path / "b").name == "step-000004"  # Ctrl-C loses no finished step
    resumed = train("vilt-vqa-tiny", DATA, target_ratio=0.5, steps=6, recipe=tokens_recipe, config=config,
                    out_dir=tmp_path / "b", resume=True, progress=False)
    assert _losses(resumed.history) == _losses(whole.history)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoints_are_safetensors_and_json(tokens_recipe, tmp_path):
    config = TrainConfig(checkpoint_every=1, keep_checkpoints=2, **FAST)
    train("vilt-vqa-tiny", DATA, target_ratio=0.5, steps=3, recipe=tokens_recipe, config=config, out_dir=tmp_path / "out",
          progress=False)
    steps = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert steps == ["step-000002", "step-000003"]
    files = {p.name for p in (tmp_path / "out" / "checkpoints" / "step-000003").iterdir()}
    assert files == {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}
    state = json.loads((tmp_path / "out" / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["step"] == 3 and len(state["history"]) == 3
    assert not [p for p in (tmp_path / "out").rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(tokens_recipe, tmp_path):
    train("vilt-vqa-tiny", DATA, target_ratio=0.5, steps=2, recipe=tokens_recipe, config=TrainConfig(**FAST),
          out_dir=tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="target_ratio"):
        train("vilt-vqa-tiny", DATA, target_ratio=0.6, steps=2, recipe=tokens_recipe, config=TrainConfig(**FAST),
              out_dir=tmp_path / "out", resume=True, progress=False)


@pytest.mark.slow
def test_saved_folder_restores_the_trained_model(tokens_recipe, tmp_path):
    from trimkit.io import load_folder

    result = train("vilt-vqa-tiny", DATA, target_ratio=0.6, steps=3, recipe=tokens_recipe,
                   config=TrainConfig(**{**FAST, "calibrate": 16}), out_dir=tmp_path / "out", progress=False)
    restored = load_folder(tmp_path / "out")
    dataset = task_dataset(resolve_data(DATA, result.backbone), result.binding)
    inputs, _ = model_batch(result.binding, collate([dataset[0]]))
    with torch.no_grad():
        a = result.backbone.task.logits(result.model.eval()(**inputs))
        b = restored.task.logits(restored.model(**inputs))
    assert torch.allclose(a, b, atol=1e-5)
    assert [rt.threshold for rt in runtimes(restored.model)] == [pytest.approx(result.threshold)]
    assert restored.task.num_labels == 20  # the head was fitted to the data's answers


@pytest.mark.parametrize("ratio", [0.0, 1.5, -0.2])
def test_target_ratio_outside_range(tokens_recipe, ratio):
    with pytest.raises(ConfigError, match=r"target ratio must be in \(0, 1\]"):
        train("vilt-vqa-tiny", DATA, target_ratio=ratio, steps=1, recipe=tokens_recipe, progress=False)


def test_unknown_data_spec(tokens_recipe):
    with pytest.raises(DataError, match="unknown synthetic task"):
        train("vilt-vqa-tiny", "synthetic:nope", target_ratio=0.5, steps=1, recipe=tokens_recipe, progress=False)


def test_recipe_without_trainable_pass(int8_recipe):
    with pytest.raises(ConfigError, match="nothing to train.*int8.dynamic"):
        train("vilt-vqa-tiny", DATA, target_ratio=0.5, steps=1, recipe=int8_recipe, progress=False)


def test_nan_loss_stops_with_a_last_good_checkpoint(tokens_recipe, tmp_path):
    backbone, *_ = prepare("vilt-vqa-tiny", DATA, recipe=tokens_recipe)
    student_calls = []

    def poison(module, args, output):
        if module.training:
            student_calls.append(1)
            if len(student_calls) == 3:
                output["logits"] = output["logits"] * float("nan")
        return output

    backbone.model.register_forward_hook(poison)
    with pytest.raises(TrimkitError, match="loss is not finite at step 3.*last good checkpoint"):
        train(backbone, DATA, target_ratio=0.5, steps=5, config=TrainConfig(**FAST), out_dir=tmp_path / "out",
              progress=False)
    last = latest_checkpoint(tmp_path / "out")
    assert last.name == "step-000002"
    state = json.loads((last / "state.json").read_text())
    assert all(np.isfinite(r["loss"]) for r in state["history"])


def test_factory_model_trains_on_truefalse(tokens_recipe):
    toy = Path(__file__).resolve().parents[1] / "models" / "toy_vlms.py"
    result = train(f"{toy}:single_stream", "synthetic:truefalse?n=16", target_ratio=0.7, steps=3,
                   recipe=tokens_recipe, config=TrainConfig(**FAST), progress=False)
    assert result.binding.keys == (("input_ids", "txt"), ("pixel_values", "img"))
    assert len(result.history) == 3 and all(np.isfinite(r["loss"]) for r in result.history)


@pytest.mark.slow
def test_full_capacity_task_loss_anchors_the_backbone(tokens_recipe):
    """With full_task > 0 the untrimmed pass is trained on the task too: the task part of the loss
    grows by that pass's loss, and the backbone's weights move differently."""
    runs = {}
    for weight in (0.0, 1.0):
        result = train("vilt-vqa-tiny", DATA, target_ratio=0.5, steps=3, recipe=tokens_recipe,
                       config=TrainConfig(**{**FAST, "full_task": weight}), progress=False)
        runs[weight] = result
    assert runs[1.0].history[0]["task"] > runs[0.0].history[0]["task"] * 1.5
    a = dict(runs[0.0].model.named_parameters())
    b = dict(runs[1.0].model.named_parameters())
    moved = [n for n in a if "trimkit" not in n and not torch.equal(a[n], b[n])]
    assert moved


def test_full_task_must_be_non_negative():
    with pytest.raises(ConfigError, match="full_task"):
        TrainConfig(full_task=-1.0)


@pytest.mark.slow
def test_lagrange_multiplier_pulls_the_ratio_to_the_target(tokens_recipe):
    """Without the square cost (beta 0) nothing moves the ratio; the multiplier (dual_lr) integrates
    the gap: it rises while the ratio is above the target, falls while below, and on its own brings
    the ratio down to the target."""
    target = 0.7
    runs = {}
    for dual_lr in (0.0, 0.3):
        config = TrainConfig(**{**FAST, "beta": 0.0, "anneal": 0.0, "lr_backbone": 0.0, "dual_lr": dual_lr})
        runs[dual_lr] = train("vilt-vqa-tiny", "synthetic:vqa?n=128", target_ratio=target, steps=40,
                              recipe=tokens_recipe, config=config, progress=False)
    weak, dual = runs[0.0], runs[0.3]
    assert "lambda" not in weak.history[-1] and weak.expected_ratio > 0.9
    ratios = [row["ratio"] for row in dual.history]
    lambdas = [0.0] + [row["lambda"] for row in dual.history]
    assert min(ratios) < target
    for r, before, after in zip(ratios, lambdas, lambdas[1:]):
        assert after - before == pytest.approx(0.3 * (r - target))


@pytest.mark.slow
def test_resume_keeps_the_multiplier(tokens_recipe, tmp_path):
    config = TrainConfig(checkpoint_every=2, **{**FAST, "dual_lr": 0.5})
    whole = train("vilt-vqa-tiny", DATA, target_ratio=0.5, steps=6, recipe=tokens_recipe, config=config,
                  out_dir=tmp_path / "a", progress=False)

    def stop_at_4(step, row):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train("vilt-vqa-tiny", DATA, target_ratio=0.5, steps=6, recipe=tokens_recipe, config=config,
              out_dir=tmp_path / "b", progress=False, callback=stop_at_4)
    resumed = train("vilt-vqa-tiny", DATA, target_ratio=0.5, steps=6, recipe=tokens_recipe, config=config,
                    out_dir=tmp_path / "b", resume=True, progress=False)
    assert [r["lambda"] for r in resumed.history] == [r["lambda"] for r in whole.history]
    assert _losses(resumed.history) == _losses(whole.history)


def test_logit_penalty_is_the_mean_squared_excess_over_the_margin():
    from trimkit.train import logit_penalty

    z = [torch.tensor([0.5, -3.0, 6.0]), torch.tensor([[-10.0]]), torch.zeros(0)]
    assert float(logit_penalty(z, margin=4.0)) == pytest.approx((0 + 0 + 2.0 ** 2 + 6.0 ** 2) / 4)
    assert float(logit_penalty(z, margin=20.0)) == 0.0
    assert logit_penalty([torch.zeros(0)], margin=1.0) is None


@pytest.mark.slow
def test_logit_penalty_pulls_the_keep_logits_in(tokens_recipe, tmp_path):
    """Keep-logits start near log-odds 3.9 (a fresh trimmer keeps 98 %); with a margin of 1 the
    penalty must bring their magnitude down, and both token and head trimmers must report them."""
    from trimkit.runtime import train_logits

    both = tmp_path / "both.toml"
    both.write_text('[[pass]]\nname = "smarttrim.tokens"\ntarget_ratio = 0.5\n\n'
                    '[[pass]]\nname = "smarttrim.heads"\ntarget_ratio = 0.5\n')
    runs = {}
    for weight in (0.0, 1.0):
        config = TrainConfig(**{**FAST, "beta": 0.0, "anneal": 0.0, "lr_backbone": 0.0, "logit_penalty": weight,
                                "logit_margin": 1.0})
        runs[weight] = train("vilt-vqa-tiny", DATA, target_ratio=0.5, steps=15, recipe=str(both), config=config,
                             progress=False)
    off, on = runs[0.0], runs[1.0]
    assert "logit" not in off.history[-1]
    assert "logit_penalty" not in TrainConfig().to_dict()  # checkpoints from before the option resume
    assert on.history[-1]["logit"] < 0.25 * on.history[0]["logit"]

    def magnitudes(result):
        model = result.model.train()
        spec = resolve_data(DATA, result.backbone, split="val")
        inputs, _ = model_batch(result.binding, collate([task_dataset(spec, result.binding)[i] for i in range(8)]))
        with torch.no_grad():
            model(**inputs)
        per_runtime = [rt.train_logits() for rt in runtimes(model)]
        assert all(len(z) for z in per_runtime)  # tokens and heads both report
        return float(torch.cat([z.reshape(-1) for z in train_logits(model)]).abs().mean())

    assert magnitudes(on) < magnitudes(off) - 1.0


@pytest.mark.slow
def test_undershoot_trains_below_the_target_and_calibrates_to_it(tokens_recipe):
    target, under = 0.8, 0.1
    config = TrainConfig(lr_backbone=2e-3, anneal=0.3, undershoot=under, **{**FAST, "calibrate": 64})
    result = train("vilt-vqa-tiny", "synthetic:vqa?n=128", target_ratio=target, steps=40, recipe=tokens_recipe,
                   config=config, progress=False)
    assert result.history[-1]["target"] == pytest.approx(target - under)
    assert result.target_ratio == target
    assert result.expected_ratio < target - under / 2  # training went below the target
    assert abs(result.calibrated_ratio - target) <= 0.05  # and the threshold keeps more to meet it
    assert config.to_dict()["undershoot"] == under and "undershoot" not in TrainConfig().to_dict()
    for bad in (float("nan"), 1.0, -1.0):  # never a training target in (0, 1]
        with pytest.raises(ConfigError, match="undershoot"):
            TrainConfig(undershoot=bad)
    for bad in (0.3, -0.8):  # training targets 0 and 1.1
        with pytest.raises(ConfigError, match="undershoot"):
            train("vilt-vqa-tiny", "synthetic:vqa?n=16", target_ratio=0.3, steps=1, recipe=tokens_recipe,
                  config=TrainConfig(undershoot=bad, **FAST), progress=False)
