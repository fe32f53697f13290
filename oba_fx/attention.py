"""Attention written with ops the pruner understands, for the library attention it meets.

* :class:`MultiheadAttention` computes what ``torch.nn.MultiheadAttention`` computes, with the
  same parameter names (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ...), but as
  ``F.linear`` → split into heads → ``scaled_dot_product_attention`` → merge → ``out_proj``, and
  without requiring the inner width (heads × head dim) to equal the embedding width. Tracing
  replaces every ``nn.MultiheadAttention`` of the traced copy by one (:func:`lower_attention`),
  so a head becomes one prunable unit across q, k, v and the output projection.
* :func:`window_attention` computes torchvision's Swin ``shifted_window_attention`` (v1 and v2)
  with the head dim read from the weights instead of from the input width, so that heads can be
  removed; slimming swaps it in for the torchvision function.

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> ref = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    >>> ours = MultiheadAttention.from_torch(ref).eval()
    >>> x = torch.randn(3, 5, 8)
    >>> torch.allclose(ours(x, x, x)[0], ref(x, x, x)[0], atol=1e-6)
    True
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from oba_fx.errors import BadInputError

log = logging.getLogger(__name__)


# ============================================================================ multi-head attention
class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` for batched inputs, traceable and prunable by heads.

    Attributes:
        num_heads: number of heads.
        head_dim: width of one head (``in_proj_weight`` has ``3 * num_heads * head_dim`` rows).
        batch_first: inputs are ``(batch, seq, feature)`` when ``True``, else ``(seq, batch, feature)``.
        dropout: dropout probability on the attention weights (training mode only).

    Not supported (such modules are left as they are, and their heads unprunable):
    ``add_bias_kv``, ``add_zero_attn``, unbatched (2-D) inputs.
    """

    def __init__(self, num_heads: int, head_dim: int, batch_first: bool, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.batch_first, self.dropout = num_heads, head_dim, batch_first, dropout

    @classmethod
    def from_torch(cls, m: nn.MultiheadAttention) -> "MultiheadAttention":
        """Share the parameters of ``m`` (no copy); raise ``ValueError`` if ``m`` uses a feature
        this class does not implement."""
        if not supports(m):
            raise BadInputError("add_bias_kv / add_zero_attn are not supported")
        new = cls(m.num_heads, m.head_dim, m.batch_first, m.dropout)
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
            p = getattr(m, name, None)
            if p is not None:
                new.register_parameter(name, p)
        # built on the meta device (no random initialisation of weights it replaces at once: on ViT-L
        # that initialisation alone took longer than the rest of the analysis)
        out = nn.Linear(m.out_proj.in_features, m.out_proj.out_features, bias=m.out_proj.bias is not None,
                        device="meta", dtype=m.out_proj.weight.dtype)
        out.weight = m.out_proj.weight
        if m.out_proj.bias is not None:
            out.bias = m.out_proj.bias
        new.out_proj = out
        new.train(m.training)
        return new

    def _project(self, query, key, value):
        bias = getattr(self, "in_proj_bias", None)
        if hasattr(self, "in_proj_weight") and query is key and key is value:
            return _three(F.linear(query, self.in_proj_weight, bias).chunk(3, dim=-1))
        if hasattr(self, "in_proj_weight"):
            ws = _three(self.in_proj_weight.chunk(3))
        else:
            ws = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        bs = _three(bias.chunk(3)) if bias is not None else (None, None, None)
        return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), ws, bs))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not self.batch_first:
            same_kv = key is value
            same_qk = query is key
            query = query.transpose(0, 1)
            key = query if same_qk else key.transpose(0, 1)
            value = key if same_kv else value.transpose(0, 1)
        q, k, v = (self._heads(t) for t in self._project(query, key, value))
        has_mask = attn_mask is not None or key_padding_mask is not None
        mask = _merge_masks(attn_mask, key_padding_mask, q.shape[0], self.num_heads, q.dtype) if has_mask else None
        # is_causal is only a hint beside the attn_mask that nn.MultiheadAttention requires with it
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        b, n = out.shape[0], out.shape[2]
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, -1))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim))
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        return out, (weights.mean(dim=1) if average_attn_weights else weights)


def _three(parts):
    """The three parts of a chunk (indexed: a traced chunk cannot be unpacked)."""
    return parts[0], parts[1], parts[2]


def _merge_masks(attn_mask, key_padding_mask, batch: int, heads: int, dtype: torch.dtype):
    """One additive float mask broadcastable to ``(batch, heads, L, S)``, or ``None``.

    ``nn.MultiheadAttention``'s boolean masks mean "True = not allowed". (It takes sizes and a
    dtype, not the queries, so that the call does not read the head channels.)"""
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, dtype)
        if mask.dim() == 3:  # (batch * heads, L, S)
            mask = mask.reshape(batch, heads, mask.shape[-2], mask.shape[-1])
    if key_padding_mask is not None:
        kpm = _additive(key_padding_mask, dtype)
        kpm = kpm.reshape(kpm.shape[0], 1, 1, kpm.shape[-1])
        mask = kpm if mask is None else mask + kpm
    return mask


def _additive(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
    return m.to(dtype)


# the mask helper branches on ranks and dtypes: one opaque call in a traced graph (its inputs are
# masks, not channels; the op table has a rule for it)
torch.fx.wrap("_merge_masks")


def supports(m: nn.MultiheadAttention) -> bool:
    """Whether :class:`MultiheadAttention` can stand in for ``m``."""
    return m.bias_k is None and m.bias_v is None and not m.add_zero_attn


def lower_attention(root: nn.Module, leaf_names: set[str] = frozenset(),
                    leaf_types: tuple[type, ...] = ()) -> list[str]:
    """Replace, in place, every ``nn.MultiheadAttention`` of ``root`` (exact type, not kept as a
    leaf by the caller) by a :class:`MultiheadAttention` sharing its parameters. Call it on a
    copy. Returns the qualified names replaced."""
    done = []
    for name, m in list(root.named_modules()):
        if type(m) is not nn.MultiheadAttention or name in leaf_names or (leaf_types and isinstance(m, leaf_types)):
            continue
        if not supports(m):
            log.info("keeping %s as nn.MultiheadAttention (add_bias_kv / add_zero_attn): its heads stay", name)
            continue
        parent, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, attr, MultiheadAttention.from_torch(m))
        done.append(name)
    return done


def has_lowered_attention(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` was traced through a :class:`MultiheadAttention` stand-in."""
    for node in gm.graph.nodes:
        for _, cls in (node.meta.get("nn_module_stack") or {}).values():
            if cls is MultiheadAttention:
                return True
    return False


def drop_dead_code(gm: torch.fx.GraphModule, prefixes: list[str]) -> None:
    """Erase unused nodes created inside the lowered modules (the attention weights nobody
    reads), so that they do not pin the heads."""
    if not prefixes:
        return
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node.users or node.op in ("placeholder", "output", "get_attr"):
                continue
            stack = node.meta.get("nn_module_stack") or {}
            paths = [v[0] for v in stack.values()]
            if any(p == f or str(p).startswith(f + ".") for p in paths for f in prefixes):
                gm.graph.erase_node(node)
                changed = True
    gm.graph.lint()
    gm.recompile()


# ============================================================================ Swin window attention
def _swin_mask(pad_h: int, pad_w: int, ws: list[int], shift: list[int], like: torch.Tensor) -> torch.Tensor:
    """Additive mask ``(windows, N, N)``: -100 between tokens that came from different regions
    of the cyclically shifted map."""
    region = torch.zeros(pad_h, pad_w, device=like.device)
    hs = [(0, pad_h - ws[0]), (pad_h - ws[0], pad_h - shift[0]), (pad_h - shift[0], pad_h)]
    wss = [(0, pad_w - ws[1]), (pad_w - ws[1], pad_w - shift[1]), (pad_w - shift[1], pad_w)]
    label = 0
    for h0, h1 in hs:
        for w0, w1 in wss:
            region[h0:h1, w0:w1] = label
            label += 1
    win = _windows(region[None, :, :, None], ws).squeeze(-1)  # (windows, N)
    diff = win[:, None, :] - win[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0, device=like.device), torch.tensor(0.0, device=like.device)).to(like.dtype)


def _windows(x: torch.Tensor, ws: list[int]) -> torch.Tensor:
    """``(B, H, W, C)`` → ``(B * windows, ws0 * ws1, C)``, windows in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // ws[0], ws[0], w // ws[1], ws[1], c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws[0] * ws[1], c)


def window_attention(input: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor,
                     relative_position_bias: torch.Tensor, window_size: list[int], num_heads: int,
                     shift_size: list[int], attention_dropout: float = 0.0, dropout: float = 0.0,
                     qkv_bias: Optional[torch.Tensor] = None, proj_bias: Optional[torch.Tensor] = None,
                     logit_scale: Optional[torch.Tensor] = None, training: bool = True) -> torch.Tensor:
    """Swin (shifted) window multi-head self-attention on a ``(B, H, W, C)`` map.

    The arguments are those of torchvision's ``shifted_window_attention``; the result equals it
    (see the tests). The head width is ``qkv_weight.shape[0] // (3 * num_heads)`` and the output
    width ``proj_weight.shape[0]``, so either may differ from the input width ``C``.

    Steps: pad H and W to whole windows; if a shift applies (the window is smaller than the
    padded map), roll the map by ``-shift``; split into windows; per window, multi-head attention
    with the relative position bias (cosine attention with a per-head logit scale for Swin v2,
    whose key bias is zero) and, when shifted, a mask keeping attention inside each region;
    project; undo the windows, the roll and the padding.
    """
    b, h, w, _ = input.shape
    ws = list(window_size)
    pad_w, pad_h = (ws[1] - w % ws[1]) % ws[1], (ws[0] - h % ws[0]) % ws[0]
    x = F.pad(input, (0, 0, 0, pad_w, 0, pad_h))
    ph, pw = h + pad_h, w + pad_w
    shift = [0 if ws[0] >= ph else shift_size[0], 0 if ws[1] >= pw else shift_size[1]]
    if shift[0] or shift[1]:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = _windows(x, ws)
    n_win, n = x.shape[0], x.shape[1]
    head_dim = qkv_weight.shape[0] // (3 * num_heads)
    if logit_scale is not None and qkv_bias is not None:
        third = qkv_bias.shape[0] // 3
        qkv_bias = torch.cat([qkv_bias[:third], torch.zeros_like(qkv_bias[third:2 * third]), qkv_bias[2 * third:]])
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(n_win, n, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        scores = scores * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        scores = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
    scores = scores + relative_position_bias
    if shift[0] or shift[1]:
        mask = _swin_mask(ph, pw, ws, shift, scores)  # (windows per image, N, N)
        per_image = mask.shape[0]
        scores = scores.reshape(n_win // per_image, per_image, num_heads, n, n) + mask[None, :, None]
        scores = scores.reshape(n_win, num_heads, n, n)
    attn = F.dropout(torch.softmax(scores, dim=-1), p=attention_dropout, training=training)
    x = (attn @ v).transpose(1, 2).reshape(n_win, n, num_heads * head_dim)
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    c_out = x.shape[-1]
    x = x.reshape(b, ph // ws[0], pw // ws[1], ws[0], ws[1], c_out).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c_out)
    if shift[0] or shift[1]:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


torch.fx.wrap("window_attention")
