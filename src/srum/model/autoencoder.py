"""Image autoencoders of the generation path: the FLUX convolutional VAE and a weight-free pixel shuffle.

BAGEL keeps its autoencoder frozen and outside ``Bagel``; the model only ever sees scaled latents
``scale_factor * (z - shift_factor)``. Both classes share that contract, with ``f = downsample``:

- ``encode(images)``: images (B, in_channels, H, W) in [-1, 1] -> latents (B, z_channels, H/f, W/f);
- ``decode(latents)``: latents (B, z_channels, h, w) -> images (B, in_channels, f*h, f*w), not clamped.

The parameter names of ``FluxAutoEncoder`` are those of the official ``ae.safetensors``, so it loads strictly.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from srum.model.config import AEConfig

_NORM_GROUPS = 32
_NORM_EPS = 1e-6


def _group_norm(channels: int) -> nn.GroupNorm:
    """The only normalisation the FLUX autoencoder uses."""
    return nn.GroupNorm(_NORM_GROUPS, channels, eps=_NORM_EPS)


def _check_images(images: torch.Tensor, config: AEConfig) -> None:
    factor = config.downsample
    if images.dim() != 4 or images.shape[1] != config.in_channels or any(side % factor for side in images.shape[2:]):
        raise ValueError(f"images: expected shape (B, {config.in_channels}, H, W) with H and W multiples of "
                         f"{factor}, got {tuple(images.shape)}")


def _check_latents(latents: torch.Tensor, config: AEConfig) -> None:
    if latents.dim() != 4 or latents.shape[1] != config.z_channels:
        raise ValueError(f"latents: expected shape (B, {config.z_channels}, h, w), got {tuple(latents.shape)}")


class ResnetBlock(nn.Module):
    """Two (GroupNorm, swish, 3x3 conv) stages added to the input; a 1x1 conv adapts the input when widths differ."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # The checkpoint stores a shortcut only where widths change; elsewhere the skip path is the identity.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, out_channels, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Residual single-head self-attention across all H*W positions, with 1x1 convs as projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, H*W, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, H*W, C), scale 1/sqrt(C)
        h = h.transpose(1, 2).reshape(batch, channels, height, width)  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halves H and W with a 3x3 stride-2 conv on the input zero-padded by one pixel on the right and bottom only."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2) for even H and W."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Doubles H and W by nearest-neighbour repetition, then smooths with a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResNet, attention, ResNet at the coarsest resolution: the autoencoder's only global mixing."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return self.block_2(self.attn_1(self.block_1(x)))


class EncoderLevel(nn.Module):
    """ResNet blocks at one resolution (the first one changes the width), then an optional ``Downsample``."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in itertools.pairwise(widths))
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, out_channels, H/2 or H, W/2 or W)."""
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class DecoderLevel(nn.Module):
    """ResNet blocks at one resolution (the first one changes the width), then an optional ``Upsample``."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in itertools.pairwise(widths))
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, out_channels, 2H or H, 2W or W)."""
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """Images to the moments of a diagonal Gaussian posterior over latents."""

    def __init__(self, config: AEConfig) -> None:
        super().__init__()
        widths = [config.ch * mult for mult in config.ch_mult]
        inputs = [config.ch] + widths[:-1]  # level i reads what level i - 1 wrote (level 0 reads conv_in)
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList(EncoderLevel(inputs[i], widths[i], config.num_res_blocks, downsample=i < last)
                                  for i in range(len(widths)))
        self.mid = MidBlock(widths[-1])
        self.norm_out = _group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.z_channels, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, 2 * z_channels, H/f, W/f): the mean, then the log-variance."""
        h = self.conv_in(images)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Unscaled latents back to images; the encoder mirrored, with one extra ResNet block per level."""

    def __init__(self, config: AEConfig) -> None:
        super().__init__()
        widths = [config.ch * mult for mult in config.ch_mult]
        # Levels run from the deepest to level 0, so level i reads what level i + 1 wrote (the deepest reads mid).
        inputs = widths[1:] + widths[-1:]
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        # Stored in level order (up.0 at full resolution) to match the checkpoint, executed in reverse.
        self.up = nn.ModuleList(DecoderLevel(inputs[i], widths[i], config.num_res_blocks + 1, upsample=i > 0)
                                for i in range(len(widths)))
        self.norm_out = _group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z_channels, h, w) -> (B, in_channels, f*h, f*w)."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class FluxAutoEncoder(nn.Module):
    """The FLUX autoencoder of ``ae.safetensors`` (``encoder.*``, ``decoder.*``), with BAGEL's scale and shift."""

    def __init__(self, config: AEConfig) -> None:
        super().__init__()
        if config.kind != "flux":
            raise ValueError(f"ae.kind: expected 'flux' for FluxAutoEncoder, got {config.kind!r}")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def downsample(self) -> int:
        """Pixels per latent pixel side."""
        return self.config.downsample

    @property
    def z_channels(self) -> int:
        return self.config.z_channels

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, each (B, z_channels, H/f, W/f), before scale and shift.

        Args:
            images: (B, in_channels, H, W) in [-1, 1], H and W multiples of ``downsample``.
        """
        _check_images(images, self.config)
        mean, logvar = self.encoder(images).chunk(2, dim=1)
        return mean, logvar

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = True) -> torch.Tensor:
        """Images to scaled latents; samples by default because BAGEL does, at inference too.

        Args:
            images: (B, in_channels, H, W) in [-1, 1], H and W multiples of ``downsample``.
            generator: source of the posterior noise (on the images' device); the global one if None.
            sample: draw ``mean + exp(logvar / 2) * noise``; if False, use the mean.

        Returns:
            (B, z_channels, H/f, W/f): ``scale_factor * (z - shift_factor)``.
        """
        mean, logvar = self.moments(images)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        return self.config.scale_factor * (z - self.config.shift_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, z_channels, h, w) to images (B, in_channels, f*h, f*w), nominally in [-1, 1]."""
        _check_latents(latents, self.config)
        return self.decoder(latents / self.config.scale_factor + self.config.shift_factor)


class PixelShuffleAutoEncoder(nn.Module):
    """Weight-free autoencoder for tiny worlds: each f x f pixel block becomes the channels of one latent pixel.

    It is a permutation (plus the affine scale and shift), so it loses no information and the generation path can
    be tested on pixels without training an autoencoder. Channel ``c*f*f + p*f + q`` of latent pixel (i, j) holds
    image channel c at pixel (f*i + p, f*j + q). The round trip is exact when scale is 1 and shift 0.
    """

    def __init__(self, config: AEConfig) -> None:
        super().__init__()
        if config.kind != "pixel_shuffle":
            raise ValueError(f"ae.kind: expected 'pixel_shuffle' for PixelShuffleAutoEncoder, got {config.kind!r}")
        self.config = config

    @property
    def downsample(self) -> int:
        """Pixels per latent pixel side."""
        return self.config.pixel_shuffle_factor

    @property
    def z_channels(self) -> int:
        return self.config.z_channels

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = True) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, z_channels, H/f, W/f); ``generator`` and ``sample`` are unused (no noise)."""
        _check_images(images, self.config)
        return self.config.scale_factor * (F.pixel_unshuffle(images, self.downsample) - self.config.shift_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, z_channels, h, w) -> (B, in_channels, f*h, f*w), the inverse of ``encode``."""
        _check_latents(latents, self.config)
        return F.pixel_shuffle(latents / self.config.scale_factor + self.config.shift_factor, self.downsample)


_AUTOENCODERS: dict[str, type[FluxAutoEncoder | PixelShuffleAutoEncoder]] = {
    "flux": FluxAutoEncoder,
    "pixel_shuffle": PixelShuffleAutoEncoder,
}


def build_autoencoder(config: AEConfig) -> FluxAutoEncoder | PixelShuffleAutoEncoder:
    """The autoencoder named by ``config.kind``."""
    if config.kind not in _AUTOENCODERS:
        raise ValueError(f"ae.kind: expected one of {sorted(_AUTOENCODERS)}, got {config.kind!r}")
    return _AUTOENCODERS[config.kind](config)


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """Decoded images (B, C, H, W) in [-1, 1] to pixels (B, H, W, C) uint8.

    Values are truncated, not rounded, as BAGEL does (0.0 becomes 127), so saved images match the official ones.
    """
    if images.dim() != 4:
        raise ValueError(f"images: expected shape (B, C, H, W), got {tuple(images.shape)}")
    pixels = (images * 0.5 + 0.5).clamp(0, 1) * 255
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def from_uint8_image(image: torch.Tensor) -> torch.Tensor:
    """Pixels (H, W, C) uint8, as images are saved, to the model's (C, H, W) float in [-1, 1]."""
    return image.permute(2, 0, 1).float() / 127.5 - 1
