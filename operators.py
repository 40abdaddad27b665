"""Affine layers as linear operators (docs/method.md §2): what the bound pass, the norms and the
stores compute with. ``OPERATORS`` maps a layer type to its operator class."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import folded
from models import LinearResidual


class ConvOperator:
    """A Conv2d as a linear operator on inputs of shape ``in_shape`` = (C, H, W)."""

    def __init__(self, layer, in_shape):
        self.layer, self.in_shape = layer, tuple(in_shape)
        h, w = in_shape[1:]
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
        out_h, out_w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        self.out_shape = (layer.out_channels, out_h, out_w)
        # conv_transpose2d needs output_padding where the strided conv dropped rows/columns
        self.output_padding = (h - ((out_h - 1) * sh - 2 * ph + kh), w - ((out_w - 1) * sw - 2 * pw + kw))

    def _conv(self, x, weight, bias):
        layer = self.layer
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    def affine(self, x):
        return self._conv(x, self.layer.weight, self.layer.bias)

    def linear(self, x):
        return self._conv(x, self.layer.weight, None)

    def absolute(self, x):
        return self._conv(x, self.layer.weight.abs(), None)

    def adjoint(self, y):
        layer = self.layer
        return F.conv_transpose2d(y, layer.weight, None, layer.stride, layer.padding,
                                  self.output_padding, layer.groups, layer.dilation)

    def weight_grad(self, u, v):
        """d/dW of sum_b <v_b, W u_b>: the conv weight gradient for input u and output gradient v."""
        layer = self.layer
        return torch.ops.aten.convolution_backward(
            v, u, layer.weight, None, layer.stride, layer.padding, layer.dilation, False, [0, 0],
            layer.groups, [False, True, False])[1]

    @property
    def fan_in(self):
        """Products summed into one output: in_channels / groups * kernel area."""
        return self.layer.weight[0].numel()

    def bias_abs(self):
        """|bias| shaped to broadcast against outputs (0 without a bias); a folded layer's bound of it
        by the sizes of its terms (``bias_size``), which its rounding is relative to."""
        if hasattr(self.layer, 'bias_size'):
            return self.layer.bias_size()
        bias = self.layer.bias
        return 0.0 if bias is None else bias.abs().view(1, -1, 1, 1)

    def row_norms(self):
        """L2 norm of each output channel's whole filter, shaped [1, C_out, 1, 1]."""
        return self.layer.weight.flatten(1).norm(dim=1).view(1, -1, 1, 1)

    def masked_row_norms(self, in_mask):
        """Per sample, the L2 norm of each output neuron's row restricted to the varying inputs
        ``in_mask`` [B, C, H, W]: ``sqrt(conv(in_mask, W**2))``, at most the whole filter's norm."""
        layer = self.layer
        squares = F.conv2d(in_mask, layer.weight * layer.weight, None, layer.stride, layer.padding,
                           layer.dilation, layer.groups)
        return torch.minimum(_root(squares), self.row_norms())


class LinearOperator:
    """A Linear layer as a linear operator."""

    def __init__(self, layer, in_shape):
        self.layer, self.in_shape = layer, tuple(in_shape)
        self.out_shape = (layer.out_features,)

    def affine(self, x):
        return F.linear(x, self.layer.weight, self.layer.bias)

    def linear(self, x):
        return F.linear(x, self.layer.weight)

    def absolute(self, x):
        return F.linear(x, self.layer.weight.abs())

    def adjoint(self, y):
        return y @ self.layer.weight

    def weight_grad(self, u, v):
        return v.t() @ u

    @property
    def fan_in(self):
        return self.layer.in_features

    def bias_abs(self):
        if hasattr(self.layer, 'bias_size'):
            return self.layer.bias_size()
        bias = self.layer.bias
        return 0.0 if bias is None else bias.abs().view(1, -1)

    def row_norms(self):
        return self.layer.weight.norm(dim=1).view(1, -1)

    def masked_row_norms(self, in_mask):
        """Per sample, ``||W_j D_in||_2`` of every row j [B, out]: ``sqrt(in_mask (W**2)^T)``."""
        weight = self.layer.weight
        return torch.minimum(_root(in_mask @ (weight * weight).t()), self.row_norms())


def _root(squares):
    """Square root of sums of squares, with no infinite gradient where a sum is 0 (a row with no
    varying input then reads 1e-18 instead of 0: still an upper bound)."""
    return squares.clamp(min=1e-36).sqrt()


OPERATORS = {nn.Conv2d: ConvOperator, nn.Linear: LinearOperator, folded.FoldedLinear: LinearOperator,
             **{cls: ConvOperator for cls in (LinearResidual, folded.FoldedConv, folded.ChannelScale, folded.PoolConv)}}


def make_operator(layer, in_shape):
    return OPERATORS[type(layer)](layer, in_shape)


def is_affine(layer):
    return type(layer) in OPERATORS
