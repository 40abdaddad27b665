"""Layers that are one affine map computed from several modules (docs/graphs.md): BatchNorm folded
into the Conv2d or Linear before it, a lone BatchNorm2d, average pooling. Each computes its weight
and bias from its parts on every use (gradients reach them; a float64 copy folds in float64), and
a folded bias says how large its terms are (``bias_size``), which its rounding is relative to."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import ConvLike


class FoldedConv(ConvLike):
    """``bn(conv(x))`` for an eval-mode BatchNorm2d: one Conv2d of weight ``a W`` and bias
    ``a (b - mean) + beta``, ``a = gamma / sqrt(var + eps)`` per output channel."""

    def __init__(self, conv, bn):
        super().__init__()
        self.conv, self.bn = conv, bn

    @property
    def weight(self):
        return self.conv.weight * channel_scale(self.bn).view(-1, 1, 1, 1)

    @property
    def bias(self):
        return folded_bias(self.conv.bias, self.bn)

    def bias_size(self):
        """An upper bound of ``|bias|`` by the sizes of its terms (their rounding is relative to it)."""
        return bias_size(self.conv.bias, self.bn).view(1, -1, 1, 1)


class FoldedLinear(nn.Module):
    """``bn(linear(x))`` for an eval-mode BatchNorm1d: one Linear (as ``FoldedConv``)."""

    def __init__(self, linear, bn):
        super().__init__()
        self.linear, self.bn = linear, bn
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self):
        return self.linear.weight * channel_scale(self.bn).view(-1, 1)

    @property
    def bias(self):
        return folded_bias(self.linear.bias, self.bn)

    def bias_size(self):
        return bias_size(self.linear.bias, self.bn).view(1, -1)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def plain(self):
        """An ``nn.Linear`` holding a copy of the current weight and bias."""
        weight = self.weight.detach()
        linear = nn.Linear(self.in_features, self.out_features, device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        linear.bias.copy_(self.bias.detach())
        return linear


class ChannelScale(ConvLike):
    """An eval-mode BatchNorm2d with no affine layer before it: a depthwise 1x1 convolution."""

    def __init__(self, bn):
        super().__init__()
        self.bn = bn
        self.conv = _Geometry(bn.num_features, bn.num_features, (1, 1), (1, 1), (0, 0), bn.num_features)

    @property
    def weight(self):
        return channel_scale(self.bn).view(-1, 1, 1, 1)

    @property
    def bias(self):
        return folded_bias(None, self.bn)

    def bias_size(self):
        return bias_size(None, self.bn).view(1, -1, 1, 1)


class PoolConv(ConvLike):
    """An average pooling of ``channels`` channels as a depthwise convolution of weights
    ``1 / (kh kw)``, made in the dtype of the module (a float64 copy holds it to the last bit)."""

    def __init__(self, channels, kernel, stride, padding):
        super().__init__()
        self.conv = _Geometry(channels, channels, kernel, stride, padding, channels)
        self.register_buffer('like', torch.zeros(()))

    @property
    def weight(self):
        kh, kw = self.kernel_size
        return torch.full((self.out_channels, 1, kh, kw), 1.0 / (kh * kw), dtype=self.like.dtype,
                          device=self.like.device)

    @property
    def bias(self):
        return None


class _Geometry:
    """The geometry fields of a Conv2d, for ``ConvLike`` maps that have no conv of their own."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, groups):
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), tuple(padding)
        self.dilation, self.padding_mode = (1, 1), 'zeros'


def channel_scale(bn):
    """``gamma / sqrt(running_var + eps)`` per channel."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    return scale * bn.weight if bn.affine else scale


def folded_bias(bias, bn):
    """``a (bias - mean) + beta`` per channel (``bias`` None: 0)."""
    centred = -bn.running_mean if bias is None else bias - bn.running_mean
    shifted = centred * channel_scale(bn)
    return shifted + bn.bias if bn.affine else shifted


def bias_size(bias, bn):
    """``(|bias| + |mean|) |a| + |beta|``: at least ``|folded_bias|``, and the scale of its rounding."""
    size = bn.running_mean.abs() if bias is None else bias.abs() + bn.running_mean.abs()
    size = size * channel_scale(bn).abs()
    return size + bn.bias.abs() if bn.affine else size
