"""`trimkit inspect`: the ModelMap of a model, as a tree or as JSON."""
from __future__ import annotations

import json

import click

from trimkit.cli import command

__all__ = ["inspect_model"]


def _params(model, path: str) -> int:
    try:
        return sum(p.numel() for p in model.get_submodule(path).parameters())
    except AttributeError:
        return 0


def _ranges(positions: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3,7"``."""
    out, start = [], None
    for i, p in enumerate(positions):
        if start is None:
            start = p
        if i + 1 == len(positions) or positions[i + 1] != p + 1:
            out.append(str(start) if start == p else f"{start}-{p}")
            start = None
    return ",".join(out) or "-"


def _tree(model_map, model):
    from rich.tree import Tree

    root = Tree(f"[bold]{model_map.model}[/] ({model_map.cls})")
    for s in model_map.streams:
        st = root.add(f"[cyan]stream[/] {s.name}  modality={s.modality}  layers={len(s.layers)}"
                      f"  inputs={','.join(s.inputs) or '-'}")
        for layer in s.layers:
            lt = st.add(f"{layer.path}  width={layer.width}  params={_params(model, layer.path):,}")
            for a in layer.attention:
                src = "" if a.kind == "self" else f" <- {a.key_stream}"
                fused = " fused-qkv" if a.fused_qkv else ""
                lt.add(f"[green]{a.kind}-attn[/] {a.path}  heads={a.heads}x{a.head_dim}{fused} op={a.op}{src}")
            if layer.ffn:
                f = layer.ffn
                lt.add(f"[magenta]ffn[/] {f.path}  {f.width}->{f.hidden}->{f.width} ({f.activation})")
    if not any(layer.attention for s in model_map.streams for layer in s.layers):
        root.add("[yellow]nothing to trim:[/] no attention site found")
    span = model_map.image_span
    if span:
        rows = "; ".join(_ranges(r) for r in span["positions"][:2]) + ("; ..." if len(span["positions"]) > 2 else "")
        root.add(f"[cyan]image span[/] vision features enter stream {span['stream']} by "
                 f"{', '.join(span['ops']) or 'a splice'} at positions {rows} (per row of the example)")
    for u in model_map.unclassified:
        root.add(f"[yellow]unclassified[/] {u}")
    for n in model_map.notes:
        root.add(f"[dim]note[/] {n}")
    return root


@command("inspect")
@click.option("--model", "model_ref", required=True, help="Backbone name, hub id, folder or file.py:factory.")
@click.option("--batch-size", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the ModelMap as one JSON object.")
def inspect_model(model_ref: str, batch_size: int, as_json: bool):
    """Find the streams, layers, attention sites and FFNs of a model from one recorded forward.

    \b
    Examples:
      trimkit inspect --model blip-vqa-tiny
      trimkit inspect --model tests/models/toy_vlms.py:two_stream --json
    """
    from trimkit.backbones import load_backbone
    from trimkit.locate import locate

    bb = load_backbone(model_ref)
    model_map = locate(bb.model, bb.example_inputs(batch_size), name=bb.name, hints=bb.hints)
    if as_json:
        click.echo(json.dumps(model_map.to_dict()))
        return
    from rich.console import Console

    Console().print(_tree(model_map, bb.model))
