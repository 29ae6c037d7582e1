"""Attention heads as prunable units.

``nn.MultiheadAttention`` ties its inner width to the model width (``embed_dim = num_heads *
head_dim``, asserted by ``F.multi_head_attention_forward``), so removing whole heads while the
residual stream keeps its width needs a module without that tie. :class:`SlimAttention` is
that module: the same parameters under the same names (``in_proj_weight``, ``in_proj_bias``,
``out_proj``) so state dicts keep their keys, any ``num_heads`` × ``head_dim`` inner width, and a
forward made of plain linear/matmul/softmax ops that export to ONNX and run on onnxruntime and
OpenVINO. A head-pruned ``nn.MultiheadAttention`` is replaced by one; an unpruned one is left
alone (torch-pruning's own pruner handles its embedding width).

torch-pruning sees a ``SlimAttention`` as one layer (:class:`SlimAttentionPruner`, registered
when the graph is built) whose input and output width is the embedding width, like it sees
``nn.MultiheadAttention``; the heads never enter its dependency graph.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

#: Attention modules whose heads :func:`prune_heads` can remove.
HEAD_TYPES = (nn.MultiheadAttention,)


class SlimAttention(nn.Module):
    """Multi-head attention with an inner width (``num_heads * head_dim``) independent of
    ``embed_dim``; call signature and return value as ``nn.MultiheadAttention``'s."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = False) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "SlimAttention":
        """The same attention as ``mha`` (same weights, same outputs)."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("only nn.MultiheadAttention with one in_proj_weight, no bias_k/bias_v and no add_zero_attn")
        m = cls(mha.embed_dim, mha.num_heads, mha.head_dim, mha.in_proj_bias is not None, mha.dropout, mha.batch_first)
        m.in_proj_weight = nn.Parameter(mha.in_proj_weight.detach().clone())
        if mha.in_proj_bias is not None:
            m.in_proj_bias = nn.Parameter(mha.in_proj_bias.detach().clone())
        m.out_proj = nn.Linear(mha.out_proj.in_features, mha.out_proj.out_features, bias=mha.out_proj.bias is not None)
        m.out_proj.load_state_dict(mha.out_proj.state_dict())
        return m.train(mha.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        inner = self.num_heads * self.head_dim
        w = self.in_proj_weight.split(inner)
        b = self.in_proj_bias.split(inner) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = F.linear(query, w[0], b[0]), F.linear(key, w[1], b[1]), F.linear(value, w[2], b[2])
        n, lq, ls = q.shape[0], q.shape[1], k.shape[1]
        q = q.reshape(n, lq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(n, ls, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(n, ls, self.num_heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.view(n, self.num_heads, lq, ls)
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if key_padding_mask is not None:
            pad = key_padding_mask.view(n, 1, 1, ls)
            scores = scores.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool else scores + pad
        attn = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, self.dropout)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(n, lq, inner)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = (attn.mean(1) if average_attn_weights else attn) if need_weights else None
        return out, weights


class SlimAttentionPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning's view of a :class:`SlimAttention`: its embedding width (in = out)."""

    def prune_out_channels(self, layer: SlimAttention, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.embed_dim)) - set(int(i) for i in idxs))
        layer.in_proj_weight = nn.Parameter(layer.in_proj_weight.data[:, keep].clone())
        lin = layer.out_proj
        lin.weight = nn.Parameter(lin.weight.data[keep].clone())
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data[keep].clone())
        lin.out_features = len(keep)
        layer.embed_dim = len(keep)
        return layer

    prune_in_channels = prune_out_channels  # one width: the residual stream's

    def get_out_channels(self, layer: SlimAttention) -> int:
        return layer.embed_dim

    def get_in_channels(self, layer: SlimAttention) -> int:
        return layer.embed_dim


CUSTOM_PRUNERS = {SlimAttention: SlimAttentionPruner()}


def num_heads(module: nn.Module) -> int:
    return int(module.num_heads)


def head_scores(module: nn.Module) -> torch.Tensor:
    """L1 magnitude of each head's weights (its q, k, v rows and its out_proj columns):
    the same magnitude criterion the channel groups use by default."""
    h = module.num_heads
    w = module.in_proj_weight.detach().abs()
    d = w.shape[0] // (3 * h)
    per = w.view(3, h, d, -1).sum((0, 2, 3))
    per = per + module.out_proj.weight.detach().abs().view(module.out_proj.out_features, h, d).sum((0, 2))
    return per


def prune_heads(model: nn.Module, name: str, drop: Sequence[int]) -> None:
    """Remove heads ``drop`` of the attention module ``name`` of ``model``, in place; an
    ``nn.MultiheadAttention`` is replaced by the equivalent :class:`SlimAttention` first."""
    module = model.get_submodule(name)
    if isinstance(module, nn.MultiheadAttention):
        module = SlimAttention.from_mha(module)
        _set_submodule(model, name, module)
    h, d = module.num_heads, module.head_dim
    drop = sorted(set(int(i) for i in drop))
    keep_heads = [i for i in range(h) if i not in drop]
    if not keep_heads:
        raise ValueError(f"{name}: cannot remove all {h} heads")
    rows = torch.tensor([j * h * d + i * d + k for j in range(3) for i in keep_heads for k in range(d)])
    cols = torch.tensor([i * d + k for i in keep_heads for k in range(d)])
    module.in_proj_weight = nn.Parameter(module.in_proj_weight.data[rows].clone())
    if module.in_proj_bias is not None:
        module.in_proj_bias = nn.Parameter(module.in_proj_bias.data[rows].clone())
    module.out_proj.weight = nn.Parameter(module.out_proj.weight.data[:, cols].clone())
    module.out_proj.in_features = len(cols)
    module.num_heads = len(keep_heads)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def sync_shape_attributes(model: nn.Module) -> None:
    """Update the integer shape attributes models read in ``forward`` after their widths changed.

    torch-pruning slices tensors and updates the layers it knows (``nn.MultiheadAttention``'s
    ``embed_dim``/``head_dim``), but a model's own attributes stay stale: torchvision's
    ``VisionTransformer.hidden_dim`` is used to reshape the patch embedding, so a pruned
    embedding width fails there. Known attributes are reset from the layers that define them.
    """
    for m in model.modules():
        proj = getattr(m, "conv_proj", None)
        if isinstance(getattr(m, "hidden_dim", None), int) and isinstance(proj, nn.Conv2d):
            m.hidden_dim = proj.out_channels  # torchvision VisionTransformer
        att = getattr(m, "self_attention", None)
        if isinstance(getattr(m, "num_heads", None), int) and isinstance(att, (nn.MultiheadAttention, SlimAttention)):
            m.num_heads = att.num_heads  # torchvision EncoderBlock
