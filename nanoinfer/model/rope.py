"""Rotary position embedding (RoPE): inverse frequencies for each scaling type, and the rotation itself."""

from __future__ import annotations

import math
from typing import Any, cast

import torch

from nanoinfer.errors import ModelLoadError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def inverse_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int
) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [head_dim/2], attention_factor) for one rope configuration."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", "default")
    if scaling is None or kind == "default":
        return inv_freq.float(), 1.0
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float(), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, scaling).float(), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling, max_positions)
    if kind == "longrope":
        return _longrope(head_dim, theta, scaling, max_positions, "short_factor")
    raise ModelLoadError(f"rope_scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def _yarn(head_dim: int, theta: float, s: dict[str, Any], max_positions: int) -> tuple[torch.Tensor, float]:
    # YaRN: interpolate low frequencies, extrapolate high ones, ramp between; scale attention by mscale.
    original = s.get("original_max_position_embeddings") or max_positions
    factor = s.get("factor") or max_positions / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    extrapolation = 1.0 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _longrope(
    head_dim: int, theta: float, s: dict[str, Any], max_positions: int, which: str
) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3): each frequency divided by its own factor, `short_factor` within the
    original context and `long_factor` beyond it; cos/sin scaled by sqrt(1 + ln f / ln L)."""
    original = s["original_max_position_embeddings"]
    factors = torch.tensor(s[which], dtype=torch.float32)
    if factors.numel() != head_dim // 2:
        raise ModelLoadError(
            f"rope_scaling {which} has {factors.numel()} values; head_dim {head_dim} needs {head_dim // 2}"
        )
    factor = s.get("factor") or max_positions / original
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    return 1.0 / (factors * theta**exponents), float(attention_factor)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin for absolute positions (rotate-half layout, as in HF), computed per batch.

    Computing angles on the fly costs T x head_dim/2 multiplies, less than a table of the
    whole context window (64 MiB for a 32k-context model with head_dim 256).
    """

    inv_freq: torch.Tensor  # a buffer: [head_dim / 2]
    long_inv_freq: torch.Tensor | None  # longrope: the frequencies past the original context

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int):
        super().__init__()
        inv_freq, self.attention_factor = inverse_frequencies(head_dim, theta, scaling, max_positions)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.long_from: int | None = None  # longrope: a batch reaching this many positions uses long_inv_freq
        long = None
        if scaling is not None and scaling.get("rope_type") == "longrope":
            long, _ = _longrope(head_dim, theta, scaling, max_positions, "long_factor")
            self.long_from = int(scaling["original_max_position_embeddings"]) + 1
        self.register_buffer("long_inv_freq", long, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, 1, head_dim], ready to broadcast over heads."""
        inv_freq = self.inv_freq
        # As transformers and vLLM do, a batch whose sequences outgrow the original context takes
        # the long factors for all its rows; K/V cached before that keep their short rotation.
        long = self.long_inv_freq is not None and self.long_from is not None and positions.numel() > 0
        if long and int(positions.max()) + 1 >= cast(int, self.long_from):
            inv_freq = cast(torch.Tensor, self.long_inv_freq)
        angles = positions.float().unsqueeze(-1) * inv_freq
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, heads, head_dim] by position: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
