"""Named activations of a model and the maps from graph nodes to them.

A :class:`Site` names an activation (``q`` of layer 2, the MLP hidden units of layer 0, …)
independently of any library; only the adapter turns it into a hook. This module also knows
which site each kind of node lives at (:func:`node_site`), how graph writers read their residual
writes off their sites (:class:`WriterLayout`) and how to capture site values in one forward.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from ..graph import EdgeGraph, Node, NodeKind

if TYPE_CHECKING:
    from .adapter import ModelAdapter

FwdHook = Callable[[torch.Tensor], "torch.Tensor | None"]

SITE_KINDS = frozenset({
    "resid_pre", "resid_mid", "q", "k", "v", "rot_q", "rot_k", "scores", "pattern", "z", "attn_out",
    "mlp_in", "mlp_post", "mlp_out", "resid_final", "attn_post_scale", "mlp_post_scale",
})


@dataclass(frozen=True)
class Site:
    """A named activation of the model.

    ``kind`` is one of: ``resid_pre`` (block input; block 0's is the embedding write), ``resid_mid``
    (between attention and MLP of a sequential block),
    ``q``/``k``/``v`` (per head, before rotary), ``rot_q``/``rot_k`` (what the softmax sees),
    ``scores`` (masked pre-softmax scores), ``pattern``, ``z``, ``attn_out``, ``mlp_in``
    (the MLP's private copy of the residual), ``mlp_post`` (hidden units), ``mlp_out``,
    ``resid_final`` (the residual read by the unembedding), ``attn_post_scale`` and
    ``mlp_post_scale`` (the scale of a sublayer's output norm, in post-normalised models).
    """

    kind: str
    layer: int = -1

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"unknown site kind {self.kind!r}")


EMBED = Site("resid_pre", 0)

NODE_SITE = {  # the site each kind of node lives at
    NodeKind.HEAD: "z", NodeKind.Q: "q", NodeKind.K: "k", NodeKind.V: "v",
    NodeKind.MLP: "mlp_out", NodeKind.NEURON: "mlp_post", NodeKind.INPUT: "resid_pre"}


def node_site(node: Node) -> tuple[Site, int | None]:
    """The site a node lives at and its index along the site's head/neuron axis."""
    if node.kind is NodeKind.LOGITS:
        raise ValueError("logits is an output, not a patchable node")
    site = Site(NODE_SITE[node.kind], node.layer if node.layer is not None else 0)
    index = node.head if node.is_attention else node.neuron
    return site, index


class WriterLayout:
    """Where each writer of a graph writes from: its site and its index along the site's axis (and,
    in post-normalised models, the output norm's scale that completes its write)."""

    def __init__(self, adapter: "ModelAdapter", graph: EdgeGraph) -> None:
        self.adapter = adapter
        self.graph = graph
        self.groups: dict[Site, tuple[list[int], list[int] | None]] = {}
        for i, w in enumerate(graph.writers):
            site, idx = node_site(w)
            rows, sel = self.groups.setdefault(site, ([], [] if idx is not None else None))
            rows.append(i)
            if sel is not None:
                sel.append(idx)  # type: ignore[arg-type]

    def scale_site(self, site: Site) -> Site | None:
        """The output-norm scale a site's writes need (post-normalised heads and neurons), if any."""
        if not self.adapter.post_norm or site.kind not in ("z", "mlp_post"):
            return None
        return Site("attn_post_scale" if site.kind == "z" else "mlp_post_scale", site.layer)

    def sites(self) -> list[Site]:
        """Every site the writes are read from."""
        out = list(self.groups)
        return out + [s for s in (self.scale_site(site) for site in self.groups) if s is not None]

    def factors(self, site: Site, source: dict[Site, torch.Tensor], base: dict[Site, torch.Tensor],
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This site's writer differences source − base as coefficients ``[b, T, n, r]`` times a
        per-writer basis ``[n, r, d_model]`` (rank ``d_head`` for heads, one for neurons); ``None``
        basis for dense writers (embedding, whole MLPs), whose coefficients are the differences.
        Computed in ``dtype`` when given (float32 for a bfloat16 model: low-precision activations
        must not cancel) and kept on the model's first device (a split model's layers live on several)."""
        _, sel = self.groups[site]
        home = self.adapter.device
        src, bas = (source[site], base[site]) if dtype is None else (source[site].to(dtype), base[site].to(dtype))
        if site.kind not in ("z", "mlp_post"):
            return (src - bas)[:, :, None, :].to(home), None
        factor = self.adapter.head_factors if site.kind == "z" else self.adapter.neuron_factors
        scale_site = self.scale_site(site)
        coef_s, basis = factor(site.layer, src[:, :, sel], source[scale_site] if scale_site else None)
        coef_b, _ = factor(site.layer, bas[:, :, sel], base[scale_site] if scale_site else None)
        return (coef_s - coef_b).to(home), basis[sel].to(home)

    def all_factors(self, source: dict[Site, torch.Tensor], base: dict[Site, torch.Tensor],
                    dtype: torch.dtype | None = None) -> dict[Site, tuple[torch.Tensor, torch.Tensor | None]]:
        """:meth:`factors` of every writer site."""
        return {site: self.factors(site, source, base, dtype) for site in self.groups}

    def deltas(self, factors: dict[Site, tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """``[b, T, W, d]`` dense writer differences in graph writer order, from :meth:`all_factors`."""
        parts: dict[int, torch.Tensor] = {}
        for site, (idx, _) in self.groups.items():
            d = expand(*factors[site])
            for k, w in enumerate(idx):
                parts[w] = d[:, :, k]
        return torch.stack([parts[w] for w in range(self.graph.n_writers)], dim=2)


def expand(coef: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Dense writes ``[b, T, n, d]`` from write factors (see :meth:`WriterLayout.factors`)."""
    if basis is None:
        return coef
    if basis.shape[1] == 1:
        return coef * basis[:, 0]
    return torch.einsum("btnr,nrd->btnd", coef.to(basis.dtype), basis)


def capture(adapter: "ModelAdapter", tokens: torch.Tensor, sites: Sequence[Site], logits: bool = True,
            cache: MutableMapping | None = None) -> tuple[torch.Tensor | None, MutableMapping]:
    """Logits (``None`` unless ``logits``) and the values at ``sites`` of one forward (no gradient),
    kept in ``cache`` (default: a dict; see :class:`edgeatp.memory.HostCache`)."""
    cache = {} if cache is None else cache

    def keep(site: Site) -> FwdHook:
        def fn(t: torch.Tensor) -> None:
            cache[site] = t.detach()
        return fn

    with torch.no_grad():
        out = adapter.forward(tokens, [(s, keep(s)) for s in dict.fromkeys(sites)], logits=logits)
    return out, cache
