"""A small PyTorch ECG-CoCa tower + GEM projectors written for the importer tests.

Our own torch implementation of the reference architecture (ECG-Chat's ECG-CoCa `EcgTransformer` as
GEM calls it with `output_last_transformer_layer=True`, open_clip residual blocks built on
`nn.MultiheadAttention`), with the same state-dict key names, so the importer is checked against a
real PyTorch forward pass.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        mlp_width = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_width)),
            ("gelu", nn.GELU()),
            ("c_proj", nn.Linear(mlp_width, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, B, D] (sequence first)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(0, 1)
        for block in self.resblocks:
            x = block(x)
        return x.transpose(0, 1)


class EcgTower(nn.Module):
    """[B, leads, samples] -> [B, 1 + samples / patch, width] (no ln_post, as GEM uses it)."""

    def __init__(self, num_samples: int, num_leads: int, patch_size: int, width: int, layers: int,
                 heads: int, mlp_ratio: float = 4.0, output_dim: int = 16):
        super().__init__()
        self.conv1 = nn.Conv1d(num_leads, width, kernel_size=patch_size, stride=patch_size,
                               bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn(num_samples // patch_size + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio)
        # Present in real checkpoints, unused for the LLM input: the importer must skip them.
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, ecg: torch.Tensor) -> torch.Tensor:
        x = self.conv1(ecg).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        return self.transformer(self.ln_pre(x))


class GemProjectors(nn.Module):
    """`ecg_projector` (linear) and `mm_projector` (mlp2x_gelu) with GEM's key names."""

    def __init__(self, ecg_width: int, ecg_proj_dim: int, llm_hidden_size: int):
        super().__init__()
        self.ecg_projector = nn.Linear(ecg_width, ecg_proj_dim)
        self.mm_projector = nn.Sequential(nn.Linear(ecg_proj_dim, llm_hidden_size), nn.GELU(),
                                          nn.Linear(llm_hidden_size, llm_hidden_size))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mm_projector(self.ecg_projector(tokens))
