"""Find streams, layers, attention sites and FFNs in a recorded graph (no per-model tables).

* An **attention site** is where an op of a registered attention kind (:mod:`trimkit.attention`) ran:
  a softmax consuming a query·key product (eager forms: matmul, bmm, einsum), or a fused kernel (SDPA,
  ``nn.MultiheadAttention``'s native op, the ``TransformerEncoderLayer`` fast path); the kind's
  ``pattern`` says how the site is read. Its q/k/v projections are the Linear(s) reached walking
  back from the product's operands; its output projection is the first Linear downstream.
* An **FFN** is Linear → elementwise activation (gated or not) → Linear, with an expansion and the
  second Linear mapping back to the first one's input width.
* A **layer** is the deepest module enclosing an attention site that holds exactly one FFN (or the
  site's parent if none does). Layers run in order; a **stream** is a chain of layers where each
  layer's main input descends from the previous layer's output (within the same container).
* A layer whose one call takes and returns the hidden states of several streams side by side (a
  co-attention layer) is one layer of each stream: each site and FFN goes with the hidden output it
  reaches first, and the streams are named ``<container>:<modality>``.
* A stream's **modality** comes from the model inputs its first layer's input descends from.
"""
from __future__ import annotations

import dataclasses
import json
from collections import deque
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn

from trimkit.attention import AttentionKind, kind_of_op
from trimkit.graph import LEAF_MODULES, Capture, ModuleCall, capture
from trimkit.splice import find_image_span

__all__ = ["ModelMap", "Stream", "Layer", "AttentionSite", "FFN", "locate", "locate_capture",
           "input_modalities"]

aten = torch.ops.aten

_PARAM_LINEAR = {aten.addmm.default, aten.mm.default, aten.linear.default, aten.matmul.default,
                 aten.bmm.default}
_LINEAR_MODULES: tuple[type, ...] = tuple(t for t in LEAF_MODULES if t.__name__ in ("Linear", "Conv1D"))
_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm)


# ----------------------------------------------------------------------------------------------
# The map
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AttentionSite:
    path: str
    kind: str  # "self" | "cross"
    heads: int
    head_dim: int
    query_stream: str = ""
    key_stream: str = ""
    q: str | None = None
    k: str | None = None
    v: str | None = None
    o: str | None = None
    fused_qkv: bool = False
    op: str = ""  # the attention kind's name (trimkit.attention): "softmax" | "sdpa" | "native_mha" | ...
    call: int = 0  # order of execution among sites (tells apart the calls of one module)
    query_input: int = -1  # graph index of the node feeding the query side
    key_input: int = -1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FFN:
    path: str
    hidden: int
    width: int
    fc_in: list[str]
    fc_out: str
    activation: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Layer:
    path: str
    attention: list[AttentionSite]
    ffn: FFN | None
    index: int = 0  # execution order of the layer call
    width: int = 0

    def to_dict(self) -> dict:
        return {"path": self.path, "width": self.width, "index": self.index,
                "attention": [a.to_dict() for a in self.attention],
                "ffn": self.ffn.to_dict() if self.ffn else None}


@dataclasses.dataclass
class Stream:
    name: str
    modality: str  # "vision" | "text" | "fused"
    layers: list[Layer]
    inputs: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "modality": self.modality, "inputs": list(self.inputs),
                "layers": [layer.to_dict() for layer in self.layers]}


@dataclasses.dataclass
class ModelMap:
    """What :func:`locate` found: streams -> layers -> attention sites and FFN.

    In :meth:`to_dict` (the ``trimkit inspect --json`` object) every attention entry has ``path``,
    ``kind``, ``heads``, ``head_dim``, ``query_stream``, ``key_stream`` and ``call``, its place in the
    order of execution. A module called several times in one forward gives one entry per call, each with
    its own streams: such entries share ``path`` and differ in ``call`` (one cross-attention module called
    text -> vision, then vision -> text). A module whose one call runs two streams side by side is a
    layer of each of them, so layers of different streams may share ``path`` too.
    """

    model: str
    cls: str
    streams: list[Stream]
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)  # input name -> role
    unclassified: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    # decoder VLMs: the stream whose input holds spliced vision features, the splicing operations and,
    # on the located example, each row's image positions (see trimkit.splice)
    image_span: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"model": self.model, "class": self.cls, "inputs": dict(self.inputs),
               "streams": [s.to_dict() for s in self.streams],
               "unclassified": list(self.unclassified), "notes": list(self.notes)}
        if self.image_span:
            out["image_span"] = dict(self.image_span)
        return out

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelMap":
        streams = []
        for s in d["streams"]:
            layers = []
            for lay in s["layers"]:
                sites = [AttentionSite(**a) for a in lay["attention"]]
                ffn = FFN(**lay["ffn"]) if lay.get("ffn") else None
                layers.append(Layer(lay["path"], sites, ffn, index=lay.get("index", 0), width=lay.get("width", 0)))
            streams.append(Stream(s["name"], s["modality"], layers, list(s.get("inputs", []))))
        return cls(d["model"], d["class"], streams, dict(d.get("inputs", {})),
                   list(d.get("unclassified", [])), list(d.get("notes", [])), dict(d.get("image_span", {})))

    # convenience -------------------------------------------------------------------------
    def sites(self) -> list[AttentionSite]:
        return [a for s in self.streams for lay in s.layers for a in lay.attention]

    def ffns(self) -> list[FFN]:
        return [lay.ffn for s in self.streams for lay in s.layers if lay.ffn]

    def stream(self, name: str) -> Stream:
        for s in self.streams:
            if s.name == name:
                return s
        raise KeyError(f"no stream {name!r}; streams: {[s.name for s in self.streams]}")

    def blocks(self) -> dict[str, str]:
        """Module path -> kind, for attributing costs (profiler)."""
        out: dict[str, str] = {}
        for a in self.sites():
            out.setdefault(a.path, "attention")
        for f in self.ffns():
            out.setdefault(f.path, "ffn")
        return out


# ----------------------------------------------------------------------------------------------
# Input roles
# ----------------------------------------------------------------------------------------------
def input_modalities(inputs: dict[str, Any], hints: dict | None = None) -> dict[str, str]:
    """Role of each model input: "vision", "text" or "aux" (masks, positions, labels)."""
    given = dict((hints or {}).get("modalities", {}))
    roles = {}
    for name, value in inputs.items():
        if name in given:
            roles[name] = given[name]
            continue
        low = name.lower()
        if any(w in low for w in ("mask", "position", "token_type", "label", "cache")):
            roles[name] = "aux"
        elif any(w in low for w in ("pixel", "image", "img", "patch", "video")):
            roles[name] = "vision"
        elif low.endswith("ids") or "text" in low or "token" in low:
            roles[name] = "text"
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 4:
            roles[name] = "vision"
        elif isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dim() == 2:
            roles[name] = "text"
        else:
            roles[name] = "aux"
    return roles


# ----------------------------------------------------------------------------------------------
# Graph helpers
# ----------------------------------------------------------------------------------------------
def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out = []
    for a in node.all_input_nodes:
        out.append(a)
    return out


def _common_prefix(paths: Iterable[str]) -> str:
    parts = [p.split(".") for p in paths if p is not None]
    if not parts:
        return ""
    common = []
    for items in zip(*parts):
        if all(x == items[0] for x in items):
            common.append(items[0])
        else:
            break
    return ".".join(common)


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


class _Graph:
    """Index over a Capture: linear nodes, module calls, helpers for walks."""

    def __init__(self, cap: Capture):
        self.cap = cap
        self.nodes = cap.nodes
        self.modules = dict(cap.model.named_modules(remove_duplicate=False))
        self.linear: dict[fx.Node, tuple[str, int, int]] = {}  # node -> (path, in, out)
        for n in self.nodes:
            info = self._linear_info(n)
            if info:
                self.linear[n] = info

    def _linear_info(self, n: fx.Node):
        if n.op == "call_module":
            mod = self.modules.get(n.target)
            if isinstance(mod, nn.Linear):
                return n.target, mod.in_features, mod.out_features
            if mod is not None and type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):
                return n.target, mod.weight.shape[0], mod.nf
            return None
        if n.op == "call_function" and n.target in _PARAM_LINEAR:
            for a in n.all_input_nodes:
                w = self._param_through_views(a)
                if w is not None and w.meta.get("trimkit.shape") and len(w.meta["trimkit.shape"]) == 2:
                    out_f, in_f = w.meta["trimkit.shape"]
                    name = w.target
                    if name.endswith(".weight"):
                        name = name[: -len(".weight")]
                    return name, in_f, out_f
        return None

    @staticmethod
    def _param_through_views(n: fx.Node, depth: int = 6):
        for _ in range(depth):
            if n.op == "get_attr":
                return n if n.meta.get("trimkit.param") else None
            if n.op == "call_function" and len(n.all_input_nodes) == 1:
                n = n.all_input_nodes[0]
            else:
                return None
        return None

    def is_norm(self, n: fx.Node) -> bool:
        return n.op == "call_module" and isinstance(self.modules.get(n.target), _NORM_MODULES)

    def back_to_linears(self, start: fx.Node, limit: int = 200) -> list[fx.Node]:
        """Nearest linear nodes upstream of ``start`` (not passing through linears or placeholders)."""
        found, seen, queue = [], {start}, deque([start])
        while queue and len(seen) < limit:
            n = queue.popleft()
            if n in self.linear and n is not start:
                found.append(n)
                continue
            if n.op in ("placeholder", "get_attr"):
                continue
            if n.op == "call_module" and not self.is_norm(n) and n is not start:
                continue
            for a in n.all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    queue.append(a)
        return found

    def forward_to_linear(self, start: fx.Node, limit: int = 60) -> fx.Node | None:
        seen, queue = {start}, deque([start])
        best = None
        while queue and len(seen) < limit:
            n = queue.popleft()
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                if u in self.linear:
                    if best is None or u.meta["trimkit.index"] < best.meta["trimkit.index"]:
                        best = u
                    continue
                if u.op == "call_module" or u.op == "output":
                    continue
                queue.append(u)
        return best


_SHAPE_OPS = {"view", "_unsafe_view", "reshape", "permute", "transpose", "expand", "clone",
              "contiguous", "select", "slice", "unsqueeze", "squeeze", "getitem", "alias",
              "detach", "t", "split", "unbind", "chunk", "_to_copy", "to"}


def _opname(n: fx.Node) -> str:
    t = n.target
    name = getattr(t, "__name__", str(t))
    return name.split(".")[0]


def _nearest_product(g: _Graph, start: fx.Node, upstream: bool, products: frozenset,
                     limit: int = 40) -> fx.Node | None:
    """Nearest non-parameter matmul (an op of ``products``) from ``start``, walking inputs (upstream) or
    users (downstream)."""
    seen, queue = {start}, deque([start])
    while queue and len(seen) < limit:
        n = queue.popleft()
        for a in (n.all_input_nodes if upstream else n.users):
            if a in seen:
                continue
            seen.add(a)
            if a.op == "call_function" and a.target in products and a not in g.linear:
                return a
            if a.op == "call_function":
                queue.append(a)
    return None


def _operand(product: fx.Node, i: int) -> fx.Node:
    args = [a for a in product.args if isinstance(a, fx.Node)]
    if product.target is aten.baddbmm.default:
        args = args[1:]
    return args[i]


# ----------------------------------------------------------------------------------------------
# Sites
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _RawSite:
    site: AttentionSite
    q_in: fx.Node | None
    k_in: fx.Node | None
    module: str  # module running the core op
    layer_hint: str | None = None  # encoder-layer fast path: the layer itself
    out: fx.Node | None = None  # the site's output (its output projection, or the fused op)
    ffn: FFN | None = None  # encoder-layer fast path: the FFN the kernel runs


def _proj(g: _Graph, operand: fx.Node) -> fx.Node | None:
    found = g.back_to_linears(operand)
    if not found:
        return None
    return max(found, key=lambda n: n.meta["trimkit.index"])


def _linear_input(n: fx.Node | None) -> fx.Node | None:
    if n is None:
        return None
    ins = [a for a in n.all_input_nodes if a.op != "get_attr"]
    return ins[0] if ins else None


def _owner(g: _Graph, path: str) -> str:
    """Module path that owns a projection (a module path, or a parameter's module)."""
    if path in g.modules:
        return path
    return _parent(path)


def _eager_site(g: _Graph, sm: fx.Node, batch: int, unclassified: list[str], kind: AttentionKind) -> _RawSite | None:
    qk = _nearest_product(g, sm, upstream=True, products=kind.products)  # query·key
    av = _nearest_product(g, sm, upstream=False, products=kind.products)  # attention·value
    where = sm.meta["trimkit.module"]
    if qk is None or av is None:
        unclassified.append(f"softmax in '{where}': no query-key / value product around it (not attention)")
        return None
    q_node, k_node, v_node = _proj(g, _operand(qk, 0)), _proj(g, _operand(qk, 1)), _proj(g, _operand(av, 1))
    if q_node is None or k_node is None:
        unclassified.append(f"softmax in '{where}': query/key do not come from a linear projection")
        return None
    shape = sm.meta["trimkit.shape"]
    if len(shape) >= 4:
        heads = shape[1]
    elif len(shape) == 3 and batch and shape[0] % batch == 0:
        heads = shape[0] // batch
    else:
        heads = 1
    head_dim = _operand(qk, 0).meta["trimkit.shape"][-1]
    o_node = g.forward_to_linear(av)
    return _make_site(g, kind.name, where, heads, head_dim, q_node, k_node, v_node, o_node)


def _make_site(g, op, where, heads, head_dim, q_node, k_node, v_node, o_node, q_in=None, k_in=None):
    q = g.linear[q_node][0] if q_node is not None else None
    k = g.linear[k_node][0] if k_node is not None else None
    v = g.linear[v_node][0] if v_node is not None else None
    o = g.linear[o_node][0] if o_node is not None else None
    fused = q is not None and q == k == v
    owners = [_owner(g, p) for p in (q, o) if p]
    path = _common_prefix(owners) if owners else where
    if len(owners) == 1 or not path:
        path = where
    q_in = q_in if q_in is not None else _linear_input(q_node)
    k_in = k_in if k_in is not None else _linear_input(k_node)
    site = AttentionSite(path=path, kind="self", heads=int(heads), head_dim=int(head_dim), q=q, k=k, v=v,
                         o=o, fused_qkv=fused, op=op,
                         query_input=q_in.meta["trimkit.index"] if q_in is not None else -1,
                         key_input=k_in.meta["trimkit.index"] if k_in is not None else -1)
    return _RawSite(site, q_in, k_in, where, out=o_node)


def _sdpa_site(g: _Graph, n: fx.Node, op: str) -> _RawSite:
    q_op, k_op, v_op = [a for a in n.args[:3]]
    shape = q_op.meta["trimkit.shape"]
    heads, head_dim = (shape[-3] if len(shape) >= 3 else 1), shape[-1]
    out = next((u for u in n.users if u.target is _getitem and u.args[1] == 0), n)
    o_node = g.forward_to_linear(out)
    return _make_site(g, op, n.meta["trimkit.module"], heads, head_dim, _proj(g, q_op), _proj(g, k_op),
                      _proj(g, v_op), o_node)


def _param_name(n) -> str | None:
    if isinstance(n, fx.Node) and n.op == "get_attr":
        name = n.target
        return name[: -len(".weight")] if name.endswith(".weight") else name
    return None


def _native_site(g: _Graph, n: fx.Node, op: str) -> _RawSite:
    query, key = n.args[0], n.args[1]
    embed, heads = n.args[3], n.args[4]
    qkv, proj = _param_name(n.args[5]), _param_name(n.args[7])
    where = n.meta["trimkit.module"]
    site = AttentionSite(path=where, kind="self", heads=int(heads), head_dim=int(embed) // int(heads),
                         q=qkv, k=qkv, v=qkv, o=proj, fused_qkv=True, op=op,
                         query_input=query.meta["trimkit.index"], key_input=key.meta["trimkit.index"])
    return _RawSite(site, query, key, where, out=n)


def _encoder_layer_site(g: _Graph, n: fx.Node, op: str) -> _RawSite:
    src, embed, heads = n.args[0], n.args[1], n.args[2]
    qkv, proj = _param_name(n.args[3]), _param_name(n.args[5])
    where = n.meta["trimkit.module"]
    w1, w2 = n.args[14], n.args[16]
    attn_path = _owner(g, qkv) if qkv else where
    site = AttentionSite(path=attn_path, kind="self", heads=int(heads), head_dim=int(embed) // int(heads),
                         q=qkv, k=qkv, v=qkv, o=proj, fused_qkv=True, op=op,
                         query_input=src.meta["trimkit.index"], key_input=src.meta["trimkit.index"])
    f1, f2 = _param_name(w1), _param_name(w2)
    hidden = w1.meta["trimkit.shape"][0]
    region = _common_prefix([_owner(g, f1), _owner(g, f2)]) or where
    ffn = FFN(path=region, hidden=int(hidden), width=int(embed), fc_in=[f1], fc_out=f2,
              activation="gelu" if n.args[7] else "relu")
    return _RawSite(site, src, src, where, layer_hint=where, ffn=ffn, out=n)


_getitem = __import__("operator").getitem

_ELEMENTWISE_ACT = {"gelu", "relu", "silu", "tanh", "sigmoid", "mul", "add", "pow", "div", "clone",
                    "_to_copy", "neg", "exp", "erf", "where", "hardtanh", "leaky_relu", "elu",
                    "native_dropout", "dropout", "getitem", "quick_gelu", "detach", "alias", "sub",
                    "clamp", "clamp_min", "relu_", "gelu_", "silu_", "view", "_unsafe_view", "reshape"}


def _find_ffns(g: _Graph, attn_projs: set[str]) -> dict[fx.Node, FFN]:
    """FFNs by the node of their second Linear."""
    ffns: dict[fx.Node, FFN] = {}
    for a, (pa, ina, outa) in g.linear.items():
        if pa in attn_projs or outa <= ina:
            continue
        seen, queue, acts, target = {a}, deque([a]), [], None
        while queue and len(seen) < 40:
            n = queue.popleft()
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                if u in g.linear:
                    pb, inb, outb = g.linear[u]
                    if inb == outa and outb == ina and pb not in attn_projs:
                        target = u
                    continue
                if u.op == "call_function" and _opname(u) in _ELEMENTWISE_ACT:
                    if _opname(u) not in ("getitem", "clone", "view", "_unsafe_view", "reshape", "detach",
                                          "alias", "_to_copy"):
                        acts.append(_opname(u))
                    queue.append(u)
        if target is None:
            continue
        act = next((x for x in acts if x not in ("mul", "add", "div", "pow", "sub", "native_dropout")),
                   acts[0] if acts else "")
        if not acts:
            continue  # two stacked linears without a nonlinearity are not an FFN
        pb = g.linear[target][0]
        if target in ffns:
            ffns[target].fc_in.append(pa)
            continue
        path = _common_prefix([_owner(g, pa), _owner(g, pb)]) or _owner(g, pa)
        ffns[target] = FFN(path=path, hidden=int(outa), width=int(ina), fc_in=[pa], fc_out=pb, activation=act)
    return ffns


# ----------------------------------------------------------------------------------------------
# Layers and streams
# ----------------------------------------------------------------------------------------------
def _is_ancestor(prefix: str, path: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def _layer_path(site_path: str, ffns: list[FFN]) -> tuple[str, FFN | None]:
    parts = site_path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        inside = [f for f in ffns if all(_is_ancestor(prefix, p) for p in f.fc_in + [f.fc_out])]
        if len(inside) == 1:
            return prefix, inside[0]
        if len(inside) > 1:
            break
    return _parent(site_path) or site_path, None


def _hidden(nodes: list[fx.Node]) -> fx.Node | None:
    for n in nodes:
        s, dt = n.meta.get("trimkit.shape"), n.meta.get("trimkit.dtype")
        if s is not None and len(s) == 3 and dt is not None and dt.is_floating_point:
            return n
    return nodes[0] if nodes else None


def _layer_sources(start: fx.Node, outputs: dict[fx.Node, str], limit: int = 4000) -> list[str]:
    """Layers whose outputs are nearest upstream of ``start``."""
    if start in outputs:
        return [outputs[start]]
    found, seen, queue = [], {start}, deque([start])
    while queue and len(seen) < limit:
        n = queue.popleft()
        if n in outputs:
            found.append(outputs[n])
            continue
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                queue.append(a)
    return found


def _raw_sites(g: _Graph, batch: int, unclassified: list[str]) -> tuple[list[_RawSite], list[FFN]]:
    """Attention sites at the ops of the registered attention kinds, in graph order, and the FFNs of
    fused encoder layers. Attention ops whose outputs meet in one output-projection call are one
    site computed in chunks (e.g. one chunk per image of a packed batch)."""
    raw: list[_RawSite] = []
    by_out: set[fx.Node] = set()
    for n in g.nodes:
        if n.op != "call_function":
            continue
        kind = kind_of_op(n.target)
        if kind is None:
            continue
        if kind.pattern == "eager":
            rs = _eager_site(g, n, batch, unclassified, kind)
        elif kind.pattern == "qkv":
            rs = _sdpa_site(g, n, kind.name)
        elif kind.pattern == "mha_kernel":
            rs = _native_site(g, n, kind.name)
        else:
            rs = _encoder_layer_site(g, n, kind.name)
        if rs is None or (rs.out is not None and rs.out in by_out):
            continue
        if rs.out is not None:
            by_out.add(rs.out)
        rs.site.call = len(raw)
        raw.append(rs)
    return raw, [r.ffn for r in raw if r.ffn is not None]


def _site_layers(raw: list[_RawSite], ffns: list[FFN],
                 unclassified: list[str]) -> tuple[list[str], dict[str, FFN | None]]:
    """The layer path of each site, and each layer's FFN."""
    layer_of_site: list[str] = []
    layer_ffn: dict[str, FFN | None] = {}
    for r in raw:
        if r.layer_hint:
            path = r.layer_hint
            ffn = r.ffn
        else:
            path, ffn = _layer_path(r.site.path, ffns)
        layer_of_site.append(path)
        layer_ffn[path] = ffn
    return layer_of_site, layer_ffn


def _unused_ffns(ffns: list[FFN], layer_ffn: dict[str, FFN | None]) -> list[str]:
    used = {id(f) for f in layer_ffn.values() if f}
    return [f"FFN '{f.path}' ({f.width}->{f.hidden}->{f.width}) belongs to no attention layer"
            for f in ffns if id(f) not in used]


# A module call that runs several streams side by side (a co-attention layer: hidden states of each stream
# in, as many out) is one layer per stream, a "lane"; internally lane k > 0 of layer ``path`` is the key
# ``path#lane<k>``.
_LANE = "#lane"


def _lane_key(path: str, lane: int) -> str:
    return path if lane == 0 else f"{path}{_LANE}{lane}"


def _key_path(key: str) -> str:
    return key.split(_LANE, 1)[0]


def _key_lane(key: str) -> int:
    return int(key.split(_LANE, 1)[1]) if _LANE in key else 0


def _hidden_all(nodes: list[fx.Node]) -> list[fx.Node]:
    """The 3-D floating-point values among ``nodes`` (hidden states)."""
    out = []
    for n in nodes:
        s, dt = n.meta.get("trimkit.shape"), n.meta.get("trimkit.dtype")
        if s is not None and len(s) == 3 and dt is not None and dt.is_floating_point and n not in out:
            out.append(n)
    return out


def _nearest_output(start: fx.Node | None, outs: list[fx.Node], limit: int = 4000) -> int | None:
    """Index in ``outs`` of the first of them reached walking forward from ``start``."""
    if start is None:
        return None
    where = {n: i for i, n in enumerate(outs)}
    seen, queue = {start}, deque([start])
    while queue and len(seen) < limit:
        n = queue.popleft()
        if n in where:
            return where[n]
        for u in n.users:
            if u not in seen:
                seen.add(u)
                queue.append(u)
    return None


def _lanes(path: str, call: ModuleCall, sites: dict[int, _RawSite], inside: list[FFN],
           ffn_nodes: dict[int, fx.Node]) -> tuple[dict[int, int], dict[int, FFN]] | None:
    """``({site number: lane}, {lane: FFN})`` of a layer call that runs several streams side by side, or
    None: each site and FFN belongs to the hidden output it reaches first; every lane needs a site and
    at most one FFN."""
    ins, outs = _hidden_all(call.inputs), _hidden_all(call.outputs)
    if len(ins) < 2 or len(outs) < 2:
        return None
    site_lane = {i: _nearest_output(r.out, outs) for i, r in sites.items()}
    ffn_lane = [(_nearest_output(ffn_nodes.get(id(f)), outs), f) for f in inside]
    lanes = set(site_lane.values())
    if None in lanes or len(lanes) < 2 or max(lanes) >= len(ins) or not {k for k, _ in ffn_lane} <= lanes:
        return None
    by_lane: dict[int, FFN] = {}
    for k, f in ffn_lane:
        if k in by_lane:
            return None
        by_lane[k] = f
    return site_lane, by_lane


def _split_lanes(cap: Capture, raw: list[_RawSite], layer_of_site: list[str], layer_ffn: dict[str, FFN | None],
                 ffns: list[FFN], ffn_nodes: dict[int, fx.Node]) -> dict[str, list[fx.Node]]:
    """Splits the layers whose call runs several streams side by side into lanes (rewriting
    ``layer_of_site`` and ``layer_ffn``); returns ``{layer path: the hidden inputs of its call}``."""
    split: dict[str, list[fx.Node]] = {}
    for path in dict.fromkeys(layer_of_site):
        call = next((c for c in cap.calls if c.path == path), None)
        if call is None or layer_ffn.get(path) is not None:
            continue
        sites = {i: raw[i] for i, p in enumerate(layer_of_site) if p == path}
        inside = [f for f in ffns if all(_is_ancestor(path, q) for q in f.fc_in + [f.fc_out])]
        found = _lanes(path, call, sites, inside, ffn_nodes)
        if found is None:
            continue
        site_lane, by_lane = found
        for i, k in site_lane.items():
            layer_of_site[i] = _lane_key(path, k)
        del layer_ffn[path]
        for k in sorted(set(site_lane.values())):
            layer_ffn[_lane_key(path, k)] = by_lane.get(k)
        split[path] = _hidden_all(call.inputs)
    return split


def _layers(cap: Capture, raw: list[_RawSite], layer_of_site: list[str], layer_ffn: dict[str, FFN | None],
            split: dict[str, list[fx.Node]]):
    """``(layer keys in order of first call, {key: Layer}, {key: main input node}, {output node: key})``;
    a key is the layer's path, or a lane's (see :func:`_split_lanes`)."""
    calls_by_path: dict[str, list[ModuleCall]] = {}
    for c in cap.calls:
        calls_by_path.setdefault(c.path, []).append(c)
    layer_order: list[str] = []
    for p in layer_of_site:
        if p not in layer_order:
            layer_order.append(p)

    def first_call(key: str) -> ModuleCall | None:
        calls = calls_by_path.get(_key_path(key))
        return calls[0] if calls else None

    layer_order.sort(key=lambda p: (first_call(p).index if first_call(p) else 0, _key_lane(p)))
    layers: dict[str, Layer] = {}
    outputs: dict[fx.Node, str] = {}
    main_in: dict[str, fx.Node | None] = {}
    for p in layer_order:
        sites = [r.site for r, lp in zip(raw, layer_of_site) if lp == p]
        call, path = first_call(p), _key_path(p)
        if path in split:
            hidden_in = split[path][_key_lane(p)]
        else:
            hidden_in = _hidden(call.inputs) if call else (raw[layer_of_site.index(p)].q_in)
        width = hidden_in.meta["trimkit.shape"][-1] if hidden_in is not None and hidden_in.meta.get(
            "trimkit.shape") else 0
        layers[p] = Layer(path, sites, layer_ffn.get(p), index=call.index if call else 0, width=int(width))
        main_in[p] = hidden_in
        for c in calls_by_path.get(p, []) if p == path else []:
            lanes = _hidden_all(c.outputs)[:len(split.get(path, []))]
            for o in c.outputs:
                outputs[o] = _lane_key(path, lanes.index(o)) if o in lanes else path
    return layer_order, layers, main_in, outputs


def _chain_layers(layer_order: list[str], layers: dict[str, Layer], main_in: dict, outputs: dict):
    """Streams as lists of layer paths: follow main inputs back to the previous layer of the same
    container. Returns ``(streams, {layer path: stream number})``."""
    stream_of: dict[str, int] = {}
    streams: list[list[str]] = []
    for p in layer_order:
        src = main_in[p]
        preds = [q for q in (_layer_sources(src, outputs) if src is not None else []) if q != p]
        same = [q for q in preds if _parent(q) == _parent(p) and q in stream_of]
        if same:
            pred = max(same, key=lambda q: layers[q].index)
            sid = stream_of[pred]
            if streams[sid][-1] == pred:
                streams[sid].append(p)
                stream_of[p] = sid
                continue
        stream_of[p] = len(streams)
        streams.append([p])
    return streams, stream_of


def _streams(streams: list[list[str]], layers: dict[str, Layer], main_in: dict, roles: dict,
             notes: list[str], split: dict) -> list[Stream]:
    """Named streams with the modality of the model inputs their first layer descends from; streams of
    layers that run side by side are named ``<container>:<modality>``."""
    out_streams: list[Stream] = []
    names_used: set[str] = set()
    for members in streams:
        base = _common_prefix(_parent(m) for m in members) or _parent(members[0]) or members[0]
        src = main_in[members[0]]
        origins = sorted(o for o in (src.meta["trimkit.origins"] if src is not None else ())
                         if roles.get(o) in ("vision", "text"))
        mods = {roles[o] for o in origins}
        modality = mods.pop() if len(mods) == 1 else "fused"
        if _key_path(members[0]) in split:
            base = f"{base}:{modality}"
        sname, k = base, 2
        while sname in names_used:
            sname, k = f"{base}#{k}", k + 1
        names_used.add(sname)
        if not origins:
            notes.append(f"stream '{sname}': its input descends from no vision or text input; called fused")
        out_streams.append(Stream(sname, modality, [layers[m] for m in members], origins))
    return out_streams


def _site_streams(raw: list[_RawSite], layer_of_site: list[str], stream_name: dict[str, str], outputs: dict,
                  split: dict[str, list[fx.Node]]):
    """Sets each site's query / key stream and whether it is self- or cross-attention. In a layer that
    runs streams side by side, a value that descends from the call's k-th hidden input is lane k's."""
    sources = dict(outputs)
    for path, ins in split.items():
        for k, n in enumerate(ins):
            sources.setdefault(n, _lane_key(path, k))
    outputs = sources
    for r, lp in zip(raw, layer_of_site):
        s = r.site
        s.query_stream = stream_name[lp]
        if r.k_in is None or r.q_in is None or r.k_in is r.q_in:
            s.kind, s.key_stream = "self", s.query_stream
            continue
        srcs = [q for q in _layer_sources(r.k_in, outputs) if q != lp]
        q_srcs = _layer_sources(r.q_in, outputs)
        if srcs and set(srcs) == set(q_srcs):
            s.kind, s.key_stream = "self", s.query_stream
        elif srcs:
            nearest = srcs[0]  # breadth-first: the layer output fewest ops away from the keys
            s.kind, s.key_stream = "cross", stream_name[nearest]
        else:
            origins = sorted(r.k_in.meta["trimkit.origins"])
            s.kind, s.key_stream = "cross", "input:" + ",".join(origins or ["?"])


def locate_capture(cap: Capture, *, name: str = "", hints: dict | None = None) -> ModelMap:
    g = _Graph(cap)
    roles = input_modalities(cap.inputs, hints)
    batch = next((t.shape[0] for k, t in cap.inputs.items() if roles.get(k) in ("vision", "text") and t.dim()), 1)
    unclassified: list[str] = []
    notes: list[str] = []
    raw, fast_ffns = _raw_sites(g, batch, unclassified)
    attn_projs = {p for r in raw for p in (r.site.q, r.site.k, r.site.v, r.site.o) if p}
    found = _find_ffns(g, attn_projs)
    ffns = list(found.values()) + fast_ffns
    ffn_nodes = {id(f): n for n, f in found.items()} | {id(r.ffn): r.out for r in raw if r.ffn is not None}
    layer_of_site, layer_ffn = _site_layers(raw, ffns, unclassified)
    split = _split_lanes(cap, raw, layer_of_site, layer_ffn, ffns, ffn_nodes)
    unclassified += _unused_ffns(ffns, layer_ffn)
    layer_order, layers, main_in, outputs = _layers(cap, raw, layer_of_site, layer_ffn, split)
    streams, stream_of = _chain_layers(layer_order, layers, main_in, outputs)
    out_streams = _streams(streams, layers, main_in, roles, notes, split)
    stream_name = {m: out_streams[sid].name for m, sid in stream_of.items()}
    _site_streams(raw, layer_of_site, stream_name, outputs, split)
    return ModelMap(name or type(cap.model).__name__, type(cap.model).__name__, out_streams,
                    roles, unclassified, notes)


def locate(model: nn.Module, inputs: dict[str, Any], *, name: str = "", hints: dict | None = None) -> ModelMap:
    """Capture one forward of ``model(**inputs)`` and build its :class:`ModelMap`.

    When vision streams feed a later stream through a splice (a decoder VLM), a second forward traces
    which positions of that stream's input hold image features (``image_span``).
    """
    model_map = locate_capture(capture(model, inputs, name=name), name=name, hints=hints)
    vision = [la.path for s in model_map.streams if s.modality == "vision" for la in s.layers]
    candidates = [(s.name, s.layers[0].path) for s in model_map.streams
                  if s.modality != "vision" and s.layers and any(r == "vision" for r in
                                                                   (model_map.inputs.get(i) for i in s.inputs))]
    if vision and candidates:
        model_map.image_span = find_image_span(model, inputs, vision, candidates) or {}
    return model_map
