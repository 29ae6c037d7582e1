"""MACs (``count_flops``) of transformers: dense ``nn.MultiheadAttention`` runs as one fused op
in eval mode, its pruned replacement (``SlimAttention``) as plain linear/matmul ops; both must
be counted the same way, or a pruned ViT looks bigger than its dense parent."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from torchvision.models.vision_transformer import VisionTransformer

from autoprune.prune.attention import SlimAttention, _set_submodule
from autoprune.prune.plan import PruningPlan, apply_plan
from autoprune.prune.structure import find_groups
from autoprune.train.models import count_flops, count_params

E, HEADS, TOKENS = 64, 4, 17  # hidden 64, 4 heads; 32x32 image, 8x8 patches: 16 patches + class token


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=HEADS, hidden_dim=E, mlp_dim=128,
                             num_classes=10).eval()


class SelfAttention(nn.Module):
    """Self-attention called as torchvision's EncoderBlock calls it."""

    def __init__(self, att: nn.Module) -> None:
        super().__init__()
        self.att = att

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.att(x, x, x, need_weights=False)[0]


def attention_macs(tokens: int, embed: int, inner: int) -> int:
    """q, k, v projections + QK^T + AV + output projection."""
    return 3 * tokens * embed * inner + 2 * tokens * tokens * inner + tokens * inner * embed


def test_dense_attention_macs_match_the_analytic_count_and_its_slim_copy():
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True).eval()
    x = torch.randn(1, TOKENS, E)
    dense = count_flops(SelfAttention(mha), x)
    assert dense == attention_macs(TOKENS, E, E)
    assert count_flops(SelfAttention(SlimAttention.from_mha(mha).eval()), x) == dense


def test_unfused_attention_path_is_counted_too():
    """Not batch-first: ``nn.MultiheadAttention`` leaves the fused op and runs
    ``scaled_dot_product_attention``, which must be counted as its matmuls."""
    mha = nn.MultiheadAttention(E, HEADS).eval()
    assert count_flops(SelfAttention(mha), torch.randn(TOKENS, 1, E)) == attention_macs(TOKENS, E, E)


def test_pruned_vit_has_fewer_macs_than_dense_and_swapping_modules_changes_nothing():
    vit, x = tiny_vit(), torch.randn(1, 3, 32, 32)
    dense = count_flops(vit, x)
    # The same weights behind SlimAttention modules: the same function, so the same count.
    swapped = copy.deepcopy(vit)
    for name, m in list(swapped.named_modules()):
        if isinstance(m, nn.MultiheadAttention):
            _set_submodule(swapped, name, SlimAttention.from_mha(m).eval())
    assert count_flops(swapped, x) == dense
    # Heads 4 -> 2 and MLP 128 -> 64 in both layers, as the pruning search does it.
    pruned = copy.deepcopy(vit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = find_groups(pruned, x, 10)
        apply_plan(pruned, x, PruningPlan({g.name: 0.5 for g in groups}), 10)
    assert count_params(pruned) < count_params(vit)
    got = count_flops(pruned, x)
    assert got < dense
    # Exactly what was removed: per layer, half the attention inner width and half the MLP width.
    removed = 2 * (attention_macs(TOKENS, E, E) - attention_macs(TOKENS, E, E // 2) + 2 * TOKENS * E * 64)
    assert dense - got == pytest.approx(removed)
