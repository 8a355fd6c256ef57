"""A PyTorch re-implementation of DiffuSETS's VAE and conditional UNet, for parity tests only.

Written from the published architecture with DiffuSETS's attribute names and tensor layouts (so its
`state_dict()` keys are those of DiffuSETS's released `.pth` files); it is not their code. Layout is
channels-first `[B, C, L]` like the original; the VAE encoder takes and the decoder returns
`[B, L, 12]`, as DiffuSETS does.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F


def _sinusoid_table(steps: int, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(torch.arange(half) * -(10.0 / (half - 1)))
    angles = (torch.arange(steps) + 1)[:, None] * freqs[None, :]
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


class TimeEmbedding(nn.Module):
    def __init__(self, steps, channels, dim_embed=64, dim_latent=128):
        super().__init__()
        self.fc1 = nn.Linear(dim_embed, dim_latent)
        self.fc2 = nn.Linear(dim_latent, channels)
        self.embeddings = nn.Parameter(_sinusoid_table(steps, dim_embed), requires_grad=False)

    def forward(self, t):
        return self.fc2(F.mish(self.fc1(self.embeddings[t])))


class SelfAttention(nn.Module):
    def __init__(self, channels, hidden_dim, num_heads):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, hidden_dim) for _ in range(3))
        self.to_out = nn.Linear(hidden_dim, channels)
        self.attention = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        normed = self.norm(x)
        h, _ = self.attention(self.to_q(normed), self.to_k(normed), self.to_v(normed))
        return self.to_out(h) + x


class CrossAttention(nn.Module):
    def __init__(self, channels, hidden_dim, num_heads, text_embed_dim):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, hidden_dim) for _ in range(3))
        self.to_out = nn.Linear(hidden_dim, channels)
        self.attention = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
        self.normalization = nn.LayerNorm(channels)
        self.value_combiner = nn.Linear(text_embed_dim + 3, channels)
        self.condition_normalization = nn.LayerNorm(channels)

    def forward(self, x, text_embed, conditions):
        q = self.to_q(self.normalization(x))
        combined = torch.cat([text_embed] + list(conditions.values()), dim=-1)  # [B, 1, D+3]
        combined = self.value_combiner(combined).repeat(1, x.shape[1], 1)  # one token, L times
        combined = self.condition_normalization(combined)
        h, _ = self.attention(q, self.to_k(combined), self.to_v(combined))
        return self.to_out(h) + x


class Block(nn.Module):
    def __init__(self, n_in, n_out, steps, kernel_size, n_heads, hidden_dim, text_embed_dim):
        super().__init__()
        mid = (n_in + n_out) // 2
        self.pre_shortcut_convs = nn.Conv1d(n_in, mid, kernel_size, padding="same")
        self.shortcut_convs = nn.Conv1d(mid, mid, 1)
        self.post_shortcut_convs = nn.Conv1d(mid, n_out, kernel_size, padding="same")
        self.down = nn.Conv1d(n_out, n_out, 3, 2, padding=1)  # present in DiffuSETS, never used
        self.layer_norm1 = nn.GroupNorm(1, mid)
        self.layer_norm2 = nn.GroupNorm(1, n_out)
        self.res_conv = nn.Conv1d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.self_attention = SelfAttention(mid, hidden_dim, n_heads)
        self.cross_attention = CrossAttention(mid, hidden_dim, n_heads, text_embed_dim)
        self.attention_norm = nn.LayerNorm(mid)
        self.time_emb = TimeEmbedding(steps, n_in)

    def forward(self, x, t, text_embed, cond):
        h = x + self.time_emb(t).unsqueeze(-1)
        h = self.shortcut_convs(F.mish(self.layer_norm1(self.pre_shortcut_convs(h))))
        h = h.transpose(-1, -2)
        h = self.attention_norm(self.cross_attention(self.self_attention(h), text_embed, cond))
        h = F.mish(self.layer_norm2(self.post_shortcut_convs(h.transpose(-1, -2))))
        return h + self.res_conv(x)


class DownsamplingBlock(nn.Module):
    def __init__(self, n_in, n_out, steps, kernel_size, n_heads, hidden_dim, text_embed_dim):
        super().__init__()
        self.down = nn.Conv1d(n_out, n_out, 3, stride=2, padding=1)
        self.block = Block(n_in, n_out, steps, kernel_size, n_heads, hidden_dim, text_embed_dim)

    def forward(self, x, t, text_embed, cond):
        h = self.block(x, t, text_embed, cond)
        return h, self.down(h)


class UpsamplingBlock(nn.Module):
    def __init__(self, n_in, n_out, steps, kernel_size, n_heads, hidden_dim, text_embed_dim,
                 up_dim):
        super().__init__()
        self.block = Block(n_in, n_out, steps, kernel_size, n_heads, hidden_dim, text_embed_dim)
        self.up = nn.ConvTranspose1d(up_dim, up_dim, kernel_size=4, stride=2, padding=1)

    def forward(self, x, skip, t, text_embed, cond):
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.block(x, t, text_embed, cond)


class BottleneckNet(nn.Module):
    def __init__(self, channels, steps, text_embed_dim, kernel_size=3, n_heads=4, hidden_dim=32):
        super().__init__()
        self.time_emb = TimeEmbedding(steps, channels)
        conv = lambda: nn.Conv1d(channels, channels, kernel_size, padding="same")  # noqa: E731
        self.bottleneck_conv1, self.bottleneck_conv1_2, self.bottleneck_conv2 = conv(), conv(), conv()
        self.bottleneck_layer_norm1 = nn.GroupNorm(1, channels)
        self.bottleneck_layer_norm2 = nn.GroupNorm(1, channels)
        self.attention_norm = nn.LayerNorm(channels)
        self.self_attention = SelfAttention(channels, hidden_dim, n_heads)
        self.cross_attention = CrossAttention(channels, hidden_dim, n_heads, text_embed_dim)

    def forward(self, x, t, text_embed, cond):
        h = x + self.time_emb(t).unsqueeze(-1)
        h = self.bottleneck_conv1_2(F.mish(self.bottleneck_layer_norm1(self.bottleneck_conv1(h))))
        h = h.transpose(-1, -2)
        h = self.attention_norm(self.cross_attention(self.self_attention(h), text_embed, cond))
        h = F.mish(self.bottleneck_layer_norm2(self.bottleneck_conv2(h.transpose(-1, -2))))
        return x + h


class ECGconditional(nn.Module):
    """DiffuSETS's UNet: x `[B, 4, 128]`, t `[B]`, text `[B, 1, D]`, conditions {name: [B, 1, 1]}."""

    def __init__(self, steps=1000, kernel_size=7, num_levels=7, n_channels=4, text_embed_dim=1536):
        super().__init__()
        down_in = [n_channels * 2 ** i for i in range(num_levels - 1)]
        down_out = [2 * c for c in down_in]
        up_in = [2 * down_in[num_levels - 2 - i] for i in range(num_levels - 1)]
        up_out = [down_out[num_levels - 2 - i] // 2 for i in range(num_levels - 1)]
        for i in range(num_levels - 2):
            up_in[num_levels - 2 - i] += down_out[i]
        args = dict(steps=steps, kernel_size=kernel_size, n_heads=8, text_embed_dim=text_embed_dim)
        self.downsampling_blocks = nn.ModuleList(
            DownsamplingBlock(down_in[i], down_out[i], hidden_dim=2 * down_in[i], **args)
            for i in range(num_levels - 1))
        self.bottelneck = BottleneckNet(down_out[-1], steps, text_embed_dim)
        self.upsampling_blocks = nn.ModuleList(
            UpsamplingBlock(up_in[j], up_out[j], hidden_dim=2 * up_in[j],
                            up_dim=up_in[0] if j == 0 else up_in[j] // 2, **args)
            for j in range(num_levels - 1))
        self.output_conv = nn.Sequential(nn.Conv1d(up_out[-1], n_channels, 3, padding="same"),
                                         nn.Mish(), nn.Conv1d(n_channels, n_channels, 1))

    def forward(self, x, t, text_embed, cond):
        skips = []
        for block in self.downsampling_blocks:
            h, x = block(x, t, text_embed, cond)
            skips.append(h)
        skips.pop()
        x = self.bottelneck(x, t, text_embed, cond)
        x = self.upsampling_blocks[0](x, None, t, text_embed, cond)
        for j, block in enumerate(self.upsampling_blocks[1:]):
            x = block(x, skips[-1 - j], t, text_embed, cond)
        return self.output_conv(x)


class VAESelfAttention(nn.Module):
    def __init__(self, n_heads, d_embed):
        super().__init__()
        self.in_proj = nn.Linear(d_embed, 3 * d_embed)
        self.out_proj = nn.Linear(d_embed, d_embed)
        self.n_heads = n_heads

    def forward(self, x):
        b, length, d = x.shape
        q, k, v = (t.view(b, length, self.n_heads, -1).transpose(1, 2)
                   for t in self.in_proj(x).chunk(3, dim=-1))
        weight = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.n_heads), dim=-1)
        return self.out_proj((weight @ v).transpose(1, 2).reshape(b, length, d))


class VAEAttentionBlock(nn.Module):
    def __init__(self, channels, groups):
        super().__init__()
        self.groupnorm = nn.GroupNorm(groups, channels)  # present in DiffuSETS, never applied
        self.attention = VAESelfAttention(1, channels)

    def forward(self, x):
        return self.attention(x.transpose(-1, -2)).transpose(-1, -2) + x


class VAEResidualBlock(nn.Module):
    def __init__(self, n_in, n_out, groups):
        super().__init__()
        self.groupnorm_1 = nn.GroupNorm(groups, n_in)
        self.conv_1 = nn.Conv1d(n_in, n_out, 3, padding=1)
        self.groupnorm_2 = nn.GroupNorm(groups, n_out)
        self.conv_2 = nn.Conv1d(n_out, n_out, 3, padding=1)
        self.residual_layer = nn.Identity() if n_in == n_out else nn.Conv1d(n_in, n_out, 1)

    def forward(self, x):
        h = self.conv_1(F.silu(self.groupnorm_1(x)))
        h = self.conv_2(F.silu(self.groupnorm_2(h)))
        return h + self.residual_layer(x)


def vae_encoder(widths=(128, 256, 512), groups=32, blocks=2, leads=12, latent=4):
    """DiffuSETS `VAE_Encoder` layer list (nn.Sequential indices = state-dict prefixes)."""
    layers, width = [nn.Conv1d(leads, widths[0], 3, padding=1)], widths[0]
    for target in widths:
        for _ in range(blocks):
            layers.append(VAEResidualBlock(width, target, groups))
            width = target
        layers.append(nn.Conv1d(width, width, 3, stride=2, padding=0))
    layers += [VAEResidualBlock(width, width, groups) for _ in range(blocks)]
    layers += [VAEResidualBlock(width, width, groups), VAEAttentionBlock(width, groups),
               VAEResidualBlock(width, width, groups), nn.GroupNorm(groups, width), nn.SiLU(),
               nn.Conv1d(width, 2 * latent, 3, padding=1), nn.Conv1d(2 * latent, 2 * latent, 1)]
    return nn.Sequential(*layers)


def vae_decoder(widths=(128, 256, 512), groups=32, blocks=2, leads=12, latent=4):
    width = widths[-1]
    layers = [nn.Conv1d(latent, latent, 1), nn.Conv1d(latent, width, 3, padding=1),
              VAEResidualBlock(width, width, groups), VAEAttentionBlock(width, groups),
              VAEResidualBlock(width, width, groups)]
    level_widths = [widths[-1]] + list(reversed(widths))
    for level, target in enumerate(level_widths):
        for _ in range(blocks + 1):
            layers.append(VAEResidualBlock(width, target, groups))
            width = target
        if level < len(level_widths) - 1:
            layers += [nn.Upsample(scale_factor=2), nn.Conv1d(width, width, 3, padding=1)]
    layers += [nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv1d(width, leads, 3, padding=1)]
    return nn.Sequential(*layers)


def encode(encoder, x, noise):
    """DiffuSETS `VAE_Encoder.forward`: x `[B, L, 12]` -> (scaled sample, mean, log_var)."""
    x = x.transpose(1, 2)
    for module in encoder:
        if getattr(module, "stride", None) == (2,):
            x = F.pad(x, (0, 1))
        x = module(x)
    mean, log_var = torch.chunk(x, 2, dim=1)
    log_var = torch.clamp(log_var, -30, 20)
    return (mean + log_var.exp().sqrt() * noise) * 0.18215, mean, log_var


def decode(decoder, z):
    """DiffuSETS `VAE_Decoder.forward`: z `[B, 4, L/8]` -> `[B, L, 12]`."""
    return decoder(z / 0.18215).transpose(1, 2)
