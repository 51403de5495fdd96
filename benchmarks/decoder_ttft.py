"""Time to first token of a decoder VLM of real width, trimmed to 2x and 3x fewer prefill FLOPs.

    python benchmarks/decoder_ttft.py [--lm-layers 6] [--vision-layers 3] [--batches 1 8]
                                      [--repeats 3] [--out benchmarks/results/decoder_ttft]

The model is a LLaVA-1.5-style ``LlavaForConditionalGeneration`` built from a config with random
weights (speed depends on the decisions, not on the weights): a CLIP ViT-B vision tower at 336 px
with 14 px patches (576 image tokens) and a language model of Qwen2-0.5B shape (width 896, 14 heads,
2 key/value heads, FFN 4864). ``--lm-layers`` / ``--vision-layers`` cut the depths (24 / 12 in the
published shapes; 8 / 4 by default keeps their proportion) to fit CPU time; per-layer costs and the
image tokens' share do not change. The trimmers start at the language model's first layer
(``--decoder-start 0``): the vision tower (about a fifth of the prefill FLOPs here) stays whole, and
with a later start the layers before it too, which caps the reachable reduction below 3x.

``smarttrim.tokens`` is applied with random trimmer weights; its threshold is set by bisection so
that the executed prefill FLOPs, counted by the profiler on the executed operations of one
prefill at batch 1, are 1/2 and 1/3 of the clean model's; each timed batch's own executed FLOPs
(padded slots of rows that keep fewer tokens included) give the reduction its speedup is judged by. Time to first token is
``generate(max_new_tokens=1)`` (image encoding, prefill, first greedy token), timed with one thread,
round-robin over the clean copy and the trimmed models, medians of ``--repeats`` rounds. Every run's
facts are written as JSON; the markdown table printed at the end is made from it.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

from trimkit.locate import locate
from trimkit.passes import apply_
from trimkit.passes.smarttrim import SmartTrimTokensConfig
from trimkit.profile import count_flops
from trimkit.runtime import runtimes, set_threshold, trim_stats

IMAGE_TOKEN = 151646
PROMPT_TEXT = 40  # text tokens around the image: a system prompt and a question


def build(lm_layers: int, vision_layers: int) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=vision_layers,
                              num_attention_heads=12, image_size=336, patch_size=14, projection_dim=768)
    text = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=lm_layers,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         image_seq_length=576, vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def inputs(batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    before = torch.randint(1, 150000, (batch, 8), generator=g)
    after = torch.randint(1, 150000, (batch, PROMPT_TEXT - 8), generator=g)
    ids = torch.cat([before, torch.full((batch, 576), IMAGE_TOKEN), after], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, 336, 336, generator=g)}


class _Prefill(torch.nn.Module):
    """One prefill forward as generate runs it (last position's logits only)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kw):
        return self.model(**kw, logits_to_keep=1).logits


def prefill_flops(model, x: dict) -> float:
    with torch.no_grad():
        return count_flops(_Prefill(model), x).flops


def calibrate(model, x: dict, target: float, full: float, steps: int = 9) -> tuple[float, float]:
    """Threshold whose executed prefill FLOPs ratio is closest to ``target`` (bisection)."""
    lo, hi, best = 0.0, 1.0, (1.0, 0.5)
    for _ in range(steps):
        mid = (lo + hi) / 2
        set_threshold(model, mid)
        ratio = prefill_flops(model, x) / full
        if abs(ratio - target) < abs(best[0] - target):
            best = (ratio, mid)
        lo, hi = (mid, hi) if ratio > target else (lo, mid)
    set_threshold(model, best[1])
    return best


def ttft(model, x: dict) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**x, max_new_tokens=1, do_sample=False, use_cache=True)
    return time.perf_counter() - start


def where_time_goes(model, x: dict, repeats: int = 3) -> dict:
    """Seconds per part of one ``generate(max_new_tokens=1)``: vision tower, projector, each language
    model layer, the trimmers, the head, and the rest (embeddings, masks, rotary, generate itself);
    medians of ``repeats`` calls, from module hooks."""
    inner = model.model
    parts = {"vision tower": inner.vision_tower, "projector": inner.multi_modal_projector, "lm head": model.lm_head}
    parts.update({f"lm layer {i}": layer for i, layer in enumerate(inner.language_model.layers)})
    trimmers = getattr(model, "trimkit_token_trimmers", None)
    runs: list[dict] = []
    for _ in range(repeats):
        spent = {k: 0.0 for k in parts}
        starts: dict = {}
        handles = []
        for name, mod in parts.items():
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: starts.__setitem__(n, time.perf_counter())))
            handles.append(mod.register_forward_hook(
                lambda m, a, o, n=name: spent.__setitem__(n, spent[n] + time.perf_counter() - starts[n])))
        total = ttft(model, x)
        for h in handles:
            h.remove()
        spent["total"] = total
        runs.append(spent)
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["rest"] = out["total"] - sum(v for k, v in out.items() if k != "total")
    if trimmers is not None:
        out["trimmer params"] = sum(p.numel() for p in trimmers.parameters())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm-layers", type=int, default=8)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--decoder-start", type=int, default=0, help="first language-model layer with a trimmer")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 1 / 3])
    ap.add_argument("--out", default="benchmarks/results/decoder_ttft")
    ap.add_argument("--where", action="store_true", help="also split one batch-1 TTFT by part (hooks)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    clean = build(args.lm_layers, args.vision_layers)
    x1 = inputs(1)
    full = prefill_flops(clean, x1)
    trimmed = {}
    for target in args.targets:
        model = copy.deepcopy(clean)
        apply_(model, SmartTrimTokensConfig(threshold=0.5, decoder_start=args.decoder_start), inputs=x1)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.trimkit_token_trimmers.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        ratio, threshold = calibrate(model, x1, target, full)
        with torch.no_grad():
            model(**x1)
        trimmed[target] = (model, ratio, threshold, trim_stats(model))
        print(f"target {target:.3f}: threshold {threshold:.4f}, executed prefill FLOPs ratio {ratio:.3f}", flush=True)
    rows = []
    for batch in args.batches:
        x = inputs(batch, seed=batch)
        models = {"clean": clean, **{f"{1 / t:.0f}x": v[0] for t, v in trimmed.items()}}
        for m in models.values():  # warm-up
            ttft(m, x)
        times = {k: [] for k in models}
        for _ in range(args.repeats):
            for k, m in models.items():
                times[k].append(ttft(m, x))
        base = statistics.median(times["clean"])
        full_b = prefill_flops(clean, x)
        for t, (model, ratio_b1, threshold, stats) in trimmed.items():
            name = f"{1 / t:.0f}x"
            med = statistics.median(times[name])
            ratio = prefill_flops(model, x) / full_b  # executed on this batch, padded slots included
            with torch.no_grad():
                model(**x)
            stats = trim_stats(model)
            rows.append({"batch": batch, "target": name, "flops_ratio": ratio, "flops_reduction": 1 / ratio,
                         "flops_ratio_calibration": ratio_b1,
                         "threshold": threshold, "ttft_clean_s": base, "ttft_trimmed_s": med,
                         "speedup": base / med, "speedup_over_reduction": (base / med) * ratio,
                         "times_clean": times["clean"], "times_trimmed": times[name], "kept": stats})
            print(f"batch {batch} {name}: TTFT {base:.3f}s -> {med:.3f}s, speedup {base / med:.2f}x for "
                  f"{1 / ratio:.2f}x fewer FLOPs ({base / med * ratio:.2f})", flush=True)
    where = {}
    if args.where:
        models = {"clean": clean, **{f"{1 / t:.0f}x": v[0] for t, v in trimmed.items()}}
        where = {name: where_time_goes(m, x1) for name, m in models.items()}
        for name, parts in where.items():
            print(name, {k: round(v, 3) for k, v in parts.items()}, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {"config": vars(args), "full_prefill_flops_batch1": full, "rows": rows, "where_time_goes": where,
              "model": {"vision": "CLIP ViT-B, 336 px, patch 14 (576 image tokens)",
                        "lm": "Qwen2-0.5B shape (896 wide, 14 heads, 2 kv heads, FFN 4864)"},
              "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}}
    (out / f"ttft-{stamp}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table(record))


def table(record: dict) -> str:
    lines = ["| batch | target | executed prefill FLOPs | TTFT clean (s) | TTFT trimmed (s) | speedup | "
             "speedup / FLOPs reduction |", "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['batch']} | {r['target']} | {r['flops_reduction']:.2f}x fewer | {r['ttft_clean_s']:.2f} | "
                     f"{r['ttft_trimmed_s']:.2f} | {r['speedup']:.2f}x | {r['speedup_over_reduction']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
