"""The Qwen2.5-VL vision tower: patch embedding, 2-D rotary, window attention in most
blocks and full attention in `fullatt_block_indexes`, and the patch merger that folds
each 2x2 block of patches into one language-model token.

Tokens are processed in "window order" (the patches of each attention window
contiguous) and put back in the merged grid's row-major order at the end, as HF does.
Parameter names are HF's (`patch_embed.proj`, `blocks.N.attn.qkv`, `merger.mlp.0`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.layers.vision_attention import varlen_attention

Grid = tuple[int, int, int]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class VisionRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.weight, self.eps)


class PatchEmbed(nn.Module):
    """HF's Conv3d with stride = kernel is one matmul over the flattened patches."""

    def __init__(self, in_channels: int, temporal_patch_size: int, patch_size: int,
                 embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(embed_dim, in_channels, temporal_patch_size,
                                                    patch_size, patch_size), requires_grad=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(pixels.to(w.dtype), w.view(w.shape[0], -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=True)
        self.up_proj = nn.Linear(dim, hidden, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=True)
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _activation(name: str):
    if name == "silu":
        return F.silu
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    raise ValueError(f"vision activation {name!r} is not supported")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cu_seqlens: list[int], cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        # Rotated in float32, as HF does, whatever the activation dtype.
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        qf, kf = q.float(), k.float()
        q = (qf * c + rotate_half(qf) * s).to(x.dtype)
        k = (kf * c + rotate_half(kf) * s).to(x.dtype)
        out = varlen_attention(q, k, v, cu_seqlens, self.head_dim ** -0.5)
        return self.proj(out.reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, act: str) -> None:
        super().__init__()
        self.norm1 = VisionRMSNorm(dim)
        self.norm2 = VisionRMSNorm(dim)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = VisionMLP(dim, mlp_hidden, act)

    def forward(self, x: torch.Tensor, cu_seqlens: list[int], cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, out_dim: int, context_dim: int, merge: int) -> None:
        super().__init__()
        self.hidden = context_dim * merge * merge
        self.ln_q = VisionRMSNorm(context_dim)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(),
                                 nn.Linear(self.hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


class Qwen2_5_VisionTransformer(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.merge = int(config.spatial_merge_size)
        self.unit = self.merge * self.merge
        self.patch_size = int(config.patch_size)
        self.window_size = int(config.window_size)
        self.full_blocks = set(int(i) for i in config.fullatt_block_indexes)
        dim, heads = int(config.hidden_size), int(config.num_heads)
        self.patch_embed = PatchEmbed(int(config.in_channels), int(config.temporal_patch_size),
                                      self.patch_size, dim)
        head_dim = dim // heads
        theta = float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        spatial = head_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.blocks = nn.ModuleList(
            VisionBlock(dim, heads, int(config.intermediate_size), config.hidden_act)
            for _ in range(int(config.depth)))
        self.merger = PatchMerger(int(config.out_hidden_size), dim, self.merge)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def forward(self, pixels: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        """pixels: the processor's rows of the items, concatenated; returns the merged
        tokens of every item, [sum(t * h * w) / merge**2, out_hidden], item after item."""
        device = pixels.device
        order, cu_windows = self.window_order(grids)
        order = order.to(device)
        cu_frames = [0]
        for t, h, w in grids:
            for _ in range(t):
                cu_frames.append(cu_frames[-1] + h * w)
        x = self.patch_embed(pixels)
        n = x.shape[0]
        x = x.view(n // self.unit, self.unit, -1)[order].view(n, -1)
        freqs = self.rotary_positions(grids).to(device)[..., None].float() * self.inv_freq
        freqs = freqs.view(n, -1)  # (h freqs, w freqs) per patch
        freqs = freqs.view(n // self.unit, self.unit, -1)[order].view(n, -1)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        for i, block in enumerate(self.blocks):
            x = block(x, cu_frames if i in self.full_blocks else cu_windows, cos, sin)
        merged = self.merger(x)
        return merged[torch.argsort(order)]

    def rotary_positions(self, grids: list[Grid]) -> torch.Tensor:
        """[patches, 2] (row, column) of each patch, patches in merge-block order."""
        m = self.merge
        out = []
        for t, h, w in grids:
            hh = torch.arange(h).view(-1, 1).expand(h, w)
            ww = torch.arange(w).view(1, -1).expand(h, w)
            hh = hh.reshape(h // m, m, w // m, m).transpose(1, 2).flatten()
            ww = ww.reshape(h // m, m, w // m, m).transpose(1, 2).flatten()
            out.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
        return torch.cat(out)

    def window_order(self, grids: list[Grid]) -> tuple[torch.Tensor, list[int]]:
        """(the merged units in window order, window boundaries in patches). Windows
        are `window_size` pixels square, cut per frame; edge windows are smaller."""
        ws = self.window_size // self.merge // self.patch_size
        order: list[torch.Tensor] = []
        cu = [0]
        base = 0
        for t, h, w in grids:
            gh, gw = h // self.merge, w // self.merge
            index = torch.arange(t * gh * gw).view(t, gh, gw)
            for f in range(t):
                for r in range(0, gh, ws):
                    for c in range(0, gw, ws):
                        win = index[f, r:r + ws, c:c + ws].reshape(-1)
                        order.append(win + base)
                        cu.append(cu[-1] + win.numel() * self.unit)
            base += t * gh * gw
        return torch.cat(order), cu
