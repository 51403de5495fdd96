"""How saturated the keep-logits of trained SmartTrim token trimmers are.

    python benchmarks/keep_logits.py

Trains `smarttrim.tokens` on the BLIP/VQA bench base exactly as the bench's ``smarttrim-tokens``
run at the 3x target does (600 steps, seed 0, one thread), then prints the last training record,
the calibrated threshold and, over 64 validation items one at a time, the share of scored tokens
whose keep-logit exceeds 0, 4, 9, 12, 17 and 24, with quantiles. A keep probability of
``sigmoid(z / tau)`` with ``z`` far above 9 (tau 0.5) has no gradient left for the cost loss, and a
threshold search over ``[0, 1]`` in twelve halvings never removes such a token.
"""
import torch

from trimkit.bench.base import train_base
from trimkit.bench.run import BenchConfig, RunSpec, smarttrim_configs, train_config
from trimkit.data import collate
from trimkit.passes.smarttrim import TokenTrimmer
from trimkit.train import train


def main() -> None:
    torch.set_num_threads(1)
    b = train_base("blip", "vqa", progress=False)
    bb = b.backbone()
    cfg = BenchConfig(families=("blip",), tasks=("vqa",), steps=600, threads=1)
    run = RunSpec("blip", "vqa", "smarttrim-tokens", 1/3, 0)
    torch.manual_seed(0)
    res = train(bb, b.data["train"], target_ratio=1 / 3, steps=600, recipe=smarttrim_configs(run.method, run.ratio),
                config=train_config(cfg, run), progress=False)
    print("last training record", res.history[-1], "threshold", res.threshold, "ratio", res.calibrated_ratio)
    rec = []
    orig = TokenTrimmer.fast_logits

    def spy(self, *a, **k):
        out = orig(self, *a, **k)
        rec.append(out.detach().flatten())
        return out

    TokenTrimmer.fast_logits = spy
    m = res.backbone.model.eval()
    ds = b.dataset("val")
    with torch.no_grad():
        for i in range(64):
            m(**{k: v for k, v in collate([ds[i]]).items() if k != "labels"})
    z = torch.cat(rec)
    for t in (0, 4, 9, 12, 17, 24):
        print(f"logit > {t}: {(z > t).float().mean():.3f}")
    print("max", z.max().item(), "quantiles 0.1/0.5/0.9/0.99",
          torch.quantile(z, torch.tensor([0.1, 0.5, 0.9, 0.99])).tolist())


if __name__ == "__main__":
    main()
