"""StyleGAN2 generator G and discriminator D (Karras et al. 2020, config-f design) in plain torch.

Plain torch ops only (no custom CUDA kernels), so the same code trains on a CPU and a GPU. The
FIR filter [1, 3, 3, 1] is a depthwise convolution (groups = channels), which is two orders of
magnitude faster on a CPU than filtering every channel as its own single-channel image.

G: z -(mapping)-> w -(broadcast to num_ws styles)-> synthesis. Synthesis blocks are named by
resolution, "b4", "b8", ..., each with up to three modulated convolutions:

    name          kernel  what                                          style index (ws[:, i])
    b4.conv1      3x3     4x4 conv on the learned constant              0
    b4.torgb      1x1     ToRGB (modulated, not demodulated)            1
    bR.conv0      3x3     upsampling conv R/2 -> R (transposed + blur)  2*log2(R) - 5
    bR.conv1      3x3     conv at R                                     2*log2(R) - 4
    bR.torgb      1x1     ToRGB, added to the upsampled skip image      2*log2(R) - 3

so num_ws = 2*log2(resolution) - 2 (14 at 256 px). `Generator.conv_layers()` lists every such
layer with its weight shape (out, in, k, k), whether it is a ToRGB, its resolution and style
index. Widths: channels(R) = min(channel_base // R, channel_max); conv0 of block R maps
channels(R/2) -> channels(R), conv1 and torgb take channels(R). For the presets:

    preset  res  widths by resolution 4, 8, 16, 32, 64, 128, 256         num_ws  G / D params
    tiny    32   32, 32, 32, 16                                          8       0.07M / 0.07M
    cpu     64   128, 128, 128, 64, 32                                   10      1.1M / 1.2M
    paper   256  512, 512, 512, 512, 512, 256, 128                       14      30.0M / 28.9M

Weight offsets for the refiner H (HyperStyle): `G(ws, weight_deltas={name: delta})` multiplies the
named layer's weight theta by (1 + delta) per sample before modulation and demodulation. delta is
(N, out, in, k, k) or broadcastable to it, e.g. (N, out, in, 1, 1) (per-channel, repeated over the
kernel window) or (N, out, 1, 1, 1), or a `FactoredDelta` (the low-rank form H makes). Layers with
a delta run as a grouped convolution with one weight per sample, the style scaling the input and
the demodulation the output; without gradients, a factored delta's kernels are made and convolved
one sample at a time instead, so that each stays in the CPU's cache. Layers without a delta use one
weight for the batch (the same scalings around a plain convolution). All differ from StyleGAN2's
fused form (the style and demodulation folded into each sample's kernel, `fused_modconv=True` for
the layers without a delta) only by float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generation.checkpoints import config_from_dict
from generation.errors import InputError
from generation.registry import NetworkSpec, register

NoiseMode = Literal["const", "random", "none"]
LRELU_GAIN = math.sqrt(2.0)  # keeps activations' second moment constant through lrelu(0.2)


@dataclass(frozen=True)
class StyleGAN2Config:
    resolution: int = 256
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    mapping_lr_mul: float = 0.01
    channel_base: int = 32768
    channel_max: int = 512
    w_avg_beta: float = 0.995  # w_avg tracks the mapping's output during training
    mbstd_group: int = 4

    def __post_init__(self) -> None:
        if self.resolution not in (32, 64, 128, 256):
            raise InputError(f"resolution {self.resolution}: must be a power of 2 from 32 to 256")
        if min(self.z_dim, self.w_dim, self.mapping_layers, self.channel_base, self.channel_max) < 1:
            raise InputError(f"{self}: dimensions and layer counts must be positive")
        if self.channels(self.resolution) < 1:
            raise InputError(f"channel_base {self.channel_base} leaves no channels at {self.resolution} px")

    def channels(self, res: int) -> int:
        return min(self.channel_base // res, self.channel_max)

    @property
    def log2_res(self) -> int:
        return int(math.log2(self.resolution))

    @property
    def num_ws(self) -> int:
        return 2 * self.log2_res - 2

    @classmethod
    def from_dict(cls, values: dict) -> StyleGAN2Config:
        return config_from_dict(cls, values)


PRESETS: dict[str, StyleGAN2Config] = {
    # Unit tests: 32 px, a few thousand parameters per layer.
    "tiny": StyleGAN2Config(resolution=32, z_dim=32, w_dim=32, mapping_layers=2, channel_base=512, channel_max=32),
    # Two CPU cores: narrow enough for recognisable samples within about two hours (see docs/BENCHMARKS.md).
    "cpu": StyleGAN2Config(resolution=64, z_dim=128, w_dim=128, mapping_layers=4, channel_base=2048, channel_max=128),
    # The paper's 256 px generator: config-f widths (512 up to 64 px), 8-layer mapping.
    "paper": StyleGAN2Config(resolution=256, z_dim=512, w_dim=512, mapping_layers=8, channel_base=32768, channel_max=512),
}


# --------------------------------------------------------------------------------------------
# FIR filtering: the [1, 3, 3, 1] binomial filter as a depthwise convolution.


def _blur_kernel(channels: int, gain: float, like: Tensor) -> Tensor:
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=like.dtype, device=like.device)
    kernel = torch.outer(taps, taps) * (gain / 64.0)
    return kernel.expand(channels, 1, 4, 4)


def blur(x: Tensor, padding: int, stride: int = 1, gain: float = 1.0) -> Tensor:
    """Low-pass filter every channel (symmetric kernel, so no flip is needed)."""
    return F.conv2d(x, _blur_kernel(x.shape[1], gain, x), stride=stride, padding=padding, groups=x.shape[1])


def upsample2x(x: Tensor) -> Tensor:
    """Zero-insertion upsampling followed by the FIR filter, as one strided transposed convolution."""
    return F.conv_transpose2d(x, _blur_kernel(x.shape[1], 4.0, x), stride=2, padding=1, groups=x.shape[1])


# --------------------------------------------------------------------------------------------
# Layers with equalised learning rate: weights are stored N(0, 1) / lr_mul and scaled at runtime.


class EqualLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0, activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init) / lr_mul)) if bias else None
        self.weight_gain = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        x = F.linear(x, self.weight * self.weight_gain, bias)
        return F.leaky_relu(x, 0.2) * LRELU_GAIN if self.activation else x

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, lr_mul={self.lr_mul:g}, activation={self.activation}"


class EqualConv2d(nn.Module):
    """Conv with equalised lr; `down=True` low-passes then takes every second pixel (D's resampling)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: bool = False, down: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.activation = activation
        self.down = down

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight * self.weight_gain
        k = weight.shape[-1]
        if not self.down:
            x = F.conv2d(x, weight, self.bias, padding=k // 2)
        elif k == 1:  # a 1x1 conv commutes with the filter: filter only the pixels that are kept
            x = F.conv2d(blur(x, padding=1, stride=2), weight, self.bias)
        else:  # pad so that (H + 2p - 4 + 1 - k) / 2 + 1 = H / 2
            x = F.conv2d(blur(x, padding=(k + 1) // 2), weight, self.bias, stride=2)
        return F.leaky_relu(x, 0.2) * LRELU_GAIN if self.activation else x

    def extra_repr(self) -> str:
        out, inp, k, _ = self.weight.shape
        return f"{inp}, {out}, kernel_size={k}, activation={self.activation}, down={self.down}"


class PixelNorm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


# --------------------------------------------------------------------------------------------
# Generator.


class MappingNetwork(nn.Module):
    """z -> w: PixelNorm, then `layers` lrelu EqualLinears with a 100x smaller learning rate."""

    def __init__(self, z_dim: int, w_dim: int, layers: int, lr_mul: float = 0.01, w_avg_beta: float = 0.995):
        super().__init__()
        self.norm = PixelNorm()
        dims = [z_dim] + [w_dim] * layers
        self.net = nn.Sequential(*[EqualLinear(a, b, lr_mul=lr_mul, activation=True) for a, b in zip(dims, dims[1:])])
        self.w_avg_beta = w_avg_beta
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: Tensor, truncation: float = 1.0, update_w_avg: bool = False) -> Tensor:
        assert z.ndim == 2, f"z must be (N, z_dim), got {tuple(z.shape)}"
        w = self.net(self.norm(z))
        if update_w_avg:
            self.update_w_avg(w.detach().mean(dim=0))
        return truncate(w, self.w_avg, truncation)

    @torch.no_grad()
    def update_w_avg(self, batch_mean: Tensor) -> None:
        self.w_avg.copy_(batch_mean.lerp(self.w_avg, self.w_avg_beta))


def truncate(w: Tensor, w_avg: Tensor, psi: float) -> Tensor:
    """The truncation trick: pull w towards the average style (psi = 0 gives w_avg)."""
    return w if psi == 1.0 else w_avg.lerp(w, psi)


@dataclass(frozen=True)
class FactoredDelta:
    """A per-sample weight offset of rank r: delta[n, o] = sum_r coefficients[n, o, r] basis[r].

    Offsets on one basis add by their coefficients, so H's steps sum without making full kernels;
    with gradients they add as full kernels instead, so that each step's loss reaches the basis
    only through its own offset, as it does for dense offsets."""

    coefficients: Tensor  # (N, out, r)
    basis: Tensor  # (r, in * k * k)
    kernel: tuple[int, int, int]  # (in, k, k)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.coefficients.shape[:2], *self.kernel)

    @property
    def ndim(self) -> int:
        return 5

    def dense(self) -> Tensor:
        """(N, out, in, k, k)."""
        return (self.coefficients @ self.basis).view(self.shape)

    def detach(self) -> FactoredDelta:
        return FactoredDelta(self.coefficients.detach(), self.basis.detach(), self.kernel)

    def __add__(self, other):
        if isinstance(other, FactoredDelta) and not torch.is_grad_enabled() and other.kernel == self.kernel and \
                other.basis.data_ptr() == self.basis.data_ptr() and other.basis.shape == self.basis.shape:
            return FactoredDelta(self.coefficients + other.coefficients, self.basis, self.kernel)
        return self.dense() + (other.dense() if isinstance(other, FactoredDelta) else other)

    __radd__ = __add__


class ModulatedConv2d(nn.Module):
    """Conv whose input channels are scaled per sample by an affine map of w (the style).

    Demodulation rescales each output channel so that unit-variance inputs give unit-variance outputs:
    w'_oik = s_i theta_oik / sqrt(sum_ik (s_i theta_oik)^2 + 1e-8).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, w_dim: int,
                 demodulate: bool = True, up: bool = False):
        super().__init__()
        assert not (up and kernel_size != 3), "upsampling is implemented for 3x3 kernels"
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)  # styles start at 1: plain conv
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.demodulate = demodulate
        self.up = up

    def forward(self, x: Tensor, w: Tensor, delta: Tensor | FactoredDelta | None = None, fused: bool | None = None) -> Tensor:
        batch, in_channels, height, width = x.shape
        out_channels, _, k, _ = self.weight.shape
        assert in_channels == self.weight.shape[1] and w.shape[0] == batch, (tuple(x.shape), tuple(w.shape))
        styles = self.affine(w)  # (N, in)
        weight = self.weight * self.weight_gain
        if delta is not None:
            assert delta.ndim == 5 and delta.shape[0] in (1, batch), f"delta {tuple(delta.shape)} for batch {batch}"
            if isinstance(delta, FactoredDelta):
                if not torch.is_grad_enabled():
                    return self._forward_factored(x, styles, weight, delta)
                delta = delta.dense()
            return self._forward_per_sample(x, styles, weight, delta)
        if not fused:  # one weight for the whole batch: the faster path (docs/BENCHMARKS.md)
            return self._forward_shared(x, styles, weight)

        # Grouped conv: one modulated (and demodulated) kernel per sample.
        weight = weight.expand(batch, -1, -1, -1, -1) * styles[:, None, :, None, None]
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        return self._grouped(x, weight)

    def _grouped(self, x: Tensor, weight: Tensor) -> Tensor:
        """x (N, in, H, W) convolved with weight (N, out, in, k, k), sample by sample, as one grouped conv."""
        batch, in_channels, height, width = x.shape
        out_channels, k = weight.shape[1], weight.shape[-1]
        x = x.reshape(1, batch * in_channels, height, width)
        if self.up:  # transposed conv takes (in, out) kernels
            weight = weight.transpose(1, 2).reshape(batch * in_channels, out_channels, k, k)
            x = F.conv_transpose2d(x, weight, stride=2, groups=batch)
            return blur(x.reshape(batch, out_channels, *x.shape[2:]), padding=1, gain=4.0)
        x = F.conv2d(x, weight.reshape(batch * out_channels, in_channels, k, k), padding=k // 2, groups=batch)
        return x.reshape(batch, out_channels, height, width)

    def _forward_per_sample(self, x: Tensor, styles: Tensor, weight: Tensor, delta: Tensor) -> Tensor:
        """The layer with weights theta (1 + delta) per sample. The style scales the input and the
        demodulation the output rather than each sample's kernel: the same result up to rounding, with
        one pass over the (N, out, in, k, k) kernels to make them and one to sum their squares."""
        weight = torch.addcmul(weight, weight, delta)  # theta (1 + delta), (N, out, in, k, k) by broadcasting
        assert weight.shape[1:] == self.weight.shape, f"delta {tuple(delta.shape)} for weight {tuple(self.weight.shape)}"
        weight = weight.expand(x.shape[0], -1, -1, -1, -1)
        x = self._grouped(x * styles[:, :, None, None], weight)
        if self.demodulate:  # sum_ik (s_i theta'_oik)^2 = sum_i s_i^2 sum_k theta'_oik^2
            energy = torch.bmm(weight.square().sum(dim=(3, 4)), styles.square()[:, :, None])[:, :, 0]
            x = x * torch.rsqrt(energy + 1e-8)[:, :, None, None]
        return x

    def _forward_factored(self, x: Tensor, styles: Tensor, weight: Tensor, delta: FactoredDelta) -> Tensor:
        """`_forward_per_sample` sample by sample: each kernel theta (1 + delta[n]) is made just
        before its convolution, while it is in the cache (at batch 16 the (N, out, in, k, k) kernels
        of the batched form are several MB per layer)."""
        assert delta.shape[1:] == self.weight.shape, f"delta {tuple(delta.shape)} for weight {tuple(self.weight.shape)}"
        flat, last = weight.reshape(weight.shape[0], -1), len(delta.coefficients) - 1
        outputs = []
        for n in range(len(x)):
            offset = delta.coefficients[min(n, last)] @ delta.basis  # (out, in * k * k)
            kernel = torch.addcmul(flat, flat, offset).view(self.weight.shape)
            outputs.append(self._forward_shared(x[n : n + 1], styles[n : n + 1], kernel))
        return torch.cat(outputs)

    def _forward_shared(self, x: Tensor, styles: Tensor, weight: Tensor) -> Tensor:
        """Same result with one weight for the batch: scale the input, convolve, scale the output."""
        x = x * styles[:, :, None, None]
        if self.up:
            x = blur(F.conv_transpose2d(x, weight.transpose(0, 1), stride=2), padding=1, gain=4.0)
        else:
            x = F.conv2d(x, weight, padding=weight.shape[-1] // 2)
        if self.demodulate:  # sum_ik (s_i theta_oik)^2 = s^2 @ sum_k theta_oik^2
            coefficients = torch.rsqrt(styles.square() @ weight.square().sum(dim=(2, 3)).t() + 1e-8)
            x = x * coefficients[:, :, None, None]
        return x

    def extra_repr(self) -> str:
        out, inp, k, _ = self.weight.shape
        return f"{inp}, {out}, kernel_size={k}, demodulate={self.demodulate}, up={self.up}"


class NoiseInjection(nn.Module):
    """Adds per-pixel Gaussian noise times a learned strength that starts at 0."""

    def __init__(self, resolution: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros([]))
        self.register_buffer("noise_const", torch.randn(1, 1, resolution, resolution))

    def forward(self, x: Tensor, mode: NoiseMode) -> Tensor:
        if mode == "none":
            return x
        noise = self.noise_const if mode == "const" else torch.randn_like(x[:, :1])
        return x + noise * self.weight


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> Tensor:
        return self.input.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    """Modulated conv, noise, bias, lrelu."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim, up=up)
        self.noise = NoiseInjection(resolution)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor, w: Tensor, noise_mode: NoiseMode, delta: Tensor | None, fused: bool | None) -> Tensor:
        x = self.noise(self.conv(x, w, delta, fused), noise_mode)
        return F.leaky_relu(x + self.bias[:, None, None], 0.2) * LRELU_GAIN


class ToRGB(nn.Module):
    """1x1 modulated conv to RGB without demodulation (the colour scale is the style's job)."""

    def __init__(self, in_channels: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, 3, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x: Tensor, w: Tensor, delta: Tensor | None, fused: bool | None) -> Tensor:
        return self.conv(x, w, delta, fused) + self.bias[:, None, None]


class SynthesisBlock(nn.Module):
    """One resolution: [upsampling conv0,] conv1, ToRGB added to the upsampled image so far."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int):
        super().__init__()
        self.name = f"b{resolution}"
        self.resolution = resolution
        self.first = resolution == 4
        if self.first:
            self.const = ConstantInput(out_channels)
        else:
            self.conv0 = StyledConv(in_channels, out_channels, w_dim, resolution, up=True)
        self.conv1 = StyledConv(out_channels, out_channels, w_dim, resolution)
        self.torgb = ToRGB(out_channels, w_dim)
        self.num_conv = 1 if self.first else 2

    def forward(self, x: Tensor | None, img: Tensor | None, ws: Tensor, noise_mode: NoiseMode,
                deltas: dict[str, Tensor], fused: bool | None) -> tuple[Tensor, Tensor]:
        """ws: (N, num_conv + 1, w_dim), the styles of this block's convs and of its ToRGB."""
        get = lambda layer: deltas.get(f"{self.name}.{layer}")  # noqa: E731
        if self.first:
            x = self.conv1(self.const(ws.shape[0]), ws[:, 0], noise_mode, get("conv1"), fused)
        else:
            x = self.conv0(x, ws[:, 0], noise_mode, get("conv0"), fused)
            x = self.conv1(x, ws[:, 1], noise_mode, get("conv1"), fused)
        y = self.torgb(x, ws[:, -1], get("torgb"), fused)
        return x, y if img is None else upsample2x(img) + y


class ConvLayerInfo(NamedTuple):
    shape: tuple[int, int, int, int]  # (out, in, k, k) of the layer's weight theta
    is_torgb: bool
    resolution: int
    w_index: int  # which ws[:, i] modulates it


class Generator(nn.Module):
    def __init__(self, config: StyleGAN2Config):
        super().__init__()
        self.config = config
        self.num_ws = config.num_ws
        self.mapping = MappingNetwork(config.z_dim, config.w_dim, config.mapping_layers,
                                      config.mapping_lr_mul, config.w_avg_beta)
        self.blocks = nn.ModuleDict()
        for log2 in range(2, config.log2_res + 1):
            res = 2**log2
            self.blocks[f"b{res}"] = SynthesisBlock(config.channels(res // 2), config.channels(res), config.w_dim, res)
        self.layer_names = frozenset(self.conv_layers())

    @property
    def w_avg(self) -> Tensor:
        return self.mapping.w_avg

    def conv_layers(self) -> dict[str, ConvLayerInfo]:
        """Every modulated conv that accepts a weight delta, in forward order."""
        layers, w_index = {}, 0
        for block in self.blocks.values():
            convs = [("conv1", block.conv1)] if block.first else [("conv0", block.conv0), ("conv1", block.conv1)]
            for layer, module in convs:
                layers[f"{block.name}.{layer}"] = ConvLayerInfo(tuple(module.conv.weight.shape), False, block.resolution, w_index)
                w_index += 1
            layers[f"{block.name}.torgb"] = ConvLayerInfo(tuple(block.torgb.conv.weight.shape), True, block.resolution, w_index)
        return layers

    def broadcast_ws(self, ws: Tensor) -> Tensor:
        """(N, w_dim) -> (N, num_ws, w_dim); (N, num_ws, w_dim) passes through."""
        if ws.ndim == 2:
            ws = ws.unsqueeze(1).expand(-1, self.num_ws, -1)
        assert ws.ndim == 3 and ws.shape[1:] == (self.num_ws, self.config.w_dim), \
            f"ws must be (N, {self.config.w_dim}) or (N, {self.num_ws}, {self.config.w_dim}), got {tuple(ws.shape)}"
        return ws

    def sample_ws(self, batch: int, mixing: float = 0.0, truncation: float = 1.0,
                  generator: torch.Generator | None = None) -> Tensor:
        """Random styles (N, num_ws, w_dim); with probability `mixing` a sample switches from one z's w
        to a second z's w at a random layer (style mixing regularisation)."""
        device = self.w_avg.device
        z = torch.randn(batch, self.config.z_dim, device=device, generator=generator)
        ws = self.broadcast_ws(self.mapping(z, truncation))
        if mixing > 0:
            z2 = torch.randn(batch, self.config.z_dim, device=device, generator=generator)
            w2 = self.mapping(z2, truncation)
            cutoff = torch.randint(1, self.num_ws, (batch,), device=device, generator=generator)
            mixed = torch.rand(batch, device=device, generator=generator) < mixing
            cutoff = torch.where(mixed, cutoff, torch.full_like(cutoff, self.num_ws))
            switch = torch.arange(self.num_ws, device=device)[None, :] >= cutoff[:, None]  # (N, num_ws)
            ws = torch.where(switch[:, :, None], w2[:, None, :], ws)
        return ws

    def forward(self, ws: Tensor, noise_mode: NoiseMode = "const", weight_deltas: dict[str, Tensor] | None = None,
                truncation: float = 1.0, fused_modconv: bool | None = None) -> Tensor:
        """Images (N, 3, R, R), roughly in [-1, 1], from w (N, w_dim) or ws (N, num_ws, w_dim)."""
        assert noise_mode in ("const", "random", "none"), noise_mode
        ws = truncate(self.broadcast_ws(ws), self.w_avg, truncation)
        deltas = weight_deltas or {}
        unknown = set(deltas) - self.layer_names
        if unknown:
            raise KeyError(f"weight_deltas for unknown layers {sorted(unknown)}; see Generator.conv_layers()")
        x = img = None
        index = 0
        for block in self.blocks.values():
            x, img = block(x, img, ws[:, index : index + block.num_conv + 1], noise_mode, deltas, fused_modconv)
            index += block.num_conv
        return img


# --------------------------------------------------------------------------------------------
# Discriminator.


class DiscriminatorBlock(nn.Module):
    """Residual: (conv 3x3, conv 3x3 down) + 1x1 down skip, summed and scaled by 1/sqrt(2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels, 3, activation=True)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, activation=True, down=True)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False, down=True)

    def forward(self, x: Tensor) -> Tensor:
        return (self.skip(x) + self.conv1(self.conv0(x))) * (1 / math.sqrt(2))


def minibatch_stddev(x: Tensor, group: int) -> Tensor:
    """Append the feature stddev over groups of samples (averaged to one channel) so D sees variety."""
    n, c, h, w = x.shape
    group = min(group, n)
    while n % group:  # the largest group size <= `group` that divides the batch
        group -= 1
    y = x.reshape(group, n // group, c, h, w)
    y = torch.sqrt(y.var(dim=0, unbiased=False) + 1e-8).mean(dim=(1, 2, 3))  # (n / group,)
    y = y.reshape(1, n // group, 1, 1, 1).expand(group, -1, 1, h, w).reshape(n, 1, h, w)
    return torch.cat([x, y], dim=1)


class Discriminator(nn.Module):
    def __init__(self, config: StyleGAN2Config):
        super().__init__()
        self.config = config
        res = config.resolution
        self.from_rgb = EqualConv2d(3, config.channels(res), 1, activation=True)
        self.blocks = nn.Sequential(*[
            DiscriminatorBlock(config.channels(2**log2), config.channels(2 ** (log2 - 1)))
            for log2 in range(config.log2_res, 2, -1)
        ])
        channels = config.channels(4)
        self.conv = EqualConv2d(channels + 1, channels, 3, activation=True)
        self.fc = EqualLinear(channels * 16, channels, activation=True)
        self.out = EqualLinear(channels, 1)

    def forward(self, img: Tensor) -> Tensor:
        """Logits (N,) for images (N, 3, R, R)."""
        res = self.config.resolution
        assert img.ndim == 4 and img.shape[1:] == (3, res, res), f"D expects (N, 3, {res}, {res}), got {tuple(img.shape)}"
        x = self.blocks(self.from_rgb(img))
        x = self.conv(minibatch_stddev(x, self.config.mbstd_group))
        return self.out(self.fc(x.flatten(1))).squeeze(1)


# --------------------------------------------------------------------------------------------
# The registry entry: BUNDLE/generator.safetensors + generator.json (config and training summary).

register(NetworkSpec(name="generator", title="generator G (G_ema)", config_from_dict=StyleGAN2Config.from_dict,
                     build=Generator, configure=lambda preset: PRESETS[preset], state_key="G",
                     train_command="train generator"))
register(NetworkSpec(name="discriminator", title="StyleGAN2 discriminator D", config_from_dict=StyleGAN2Config.from_dict,
                     build=Discriminator, configure=lambda preset: PRESETS[preset], state_key="D",
                     train_command="train generator"))
