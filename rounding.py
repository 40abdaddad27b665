"""Outward rounding for the rigorous float64 pass (docs/certificates.md, "Floating point"): the
next float below / above, products rounded up, the slack of a float64 sum, and the rigorous steps
of an affine layer and of the ball's coordinate bounds."""
import contextlib
import copy
import math

import torch


#
# A guaranteed pass runs in float64 on an exact float64 copy of the model and covers every rounding,
# so that its boxes and balls contain the images of the real-valued network of the stored weights
# (docs/certificates.md, "Floating point"). One operation rounded to nearest is within half an ulp
# of its real result, so ``nextafter`` away from it gives a bound on the right side. A sum of n
# products computed in any order (blocked, with FMA) is within gamma_n = n u / (1 - n u) times the
# sum of the absolute products (Higham, Accuracy and Stability of Numerical Algorithms, §3.1);
# ``slack_factor`` takes 4 (n + 4) u, which also covers the few operations around each sum.

UNIT_ROUNDOFF = 2.0 ** -53


def down(t):
    """The next float64 below ``t`` (a lower bound of a real number ``t`` rounds to)."""
    return torch.nextafter(t, torch.full_like(t, -math.inf))


def up(t):
    """The next float64 above ``t``."""
    return torch.nextafter(t, torch.full_like(t, math.inf))


def up_product(a, b):
    """An upper bound of ``a * b`` (non-negative factors) that stays exactly 0 when a factor is 0."""
    product = a * b
    return torch.where((a == 0) | (b == 0), torch.zeros_like(product), up(product))


def slack_factor(terms):
    """Relative rounding slack of a float64 sum of ``terms`` products and a few operations around it."""
    return 4 * (terms + 4) * UNIT_ROUNDOFF


def rigorous_affine(op, layer_rows, state, sigma):
    """(lower, upper, centre, centre_err, radius) after affine ``op`` in float64, every rounding
    covered: the box by interval arithmetic (mid/radius form), the ball-implied box by the centre's
    enclosure plus ``radius * layer_rows`` (row norms, inflated for their own rounding)."""
    slack = slack_factor(op.fan_in)
    mid = (state.lower + state.upper) * 0.5
    half = up(torch.maximum(state.upper - mid, mid - state.lower))      # [lower, upper] within mid +/- half
    box_mid, box_rad = op.affine(mid), op.absolute(half)
    widen = slack * (op.absolute(mid.abs() + half) + op.bias_abs())
    box_low, box_high = down(down(box_mid - box_rad) - widen), up(up(box_mid + box_rad) + widen)
    centre = op.affine(state.centre)
    # |W| err + gamma (|W| |c| + |b|) as one sum of non-negative terms, whose own rounding the
    # factor (1 + slack) covers
    centre_err = up((op.absolute(state.centre_err + slack * state.centre.abs()) + slack * op.bias_abs())
                     * (1 + slack))
    r = state.radius.view(-1, *([1] * (centre.dim() - 1)))
    reach = up(up(r * (layer_rows * (1 + slack))) + centre_err)
    lower = torch.maximum(box_low, down(centre - reach))
    upper = torch.minimum(box_high, up(centre + reach))
    return lower, upper, centre, centre_err, up_product(state.radius, sigma)


def rigorous_ball_ends(state):
    """The box intersected with the ball's coordinate bounds, the centre's error included."""
    r = state.radius.view(-1, *([1] * (state.centre.dim() - 1)))
    reach = up(state.centre_err + r)
    return (torch.maximum(state.lower, down(state.centre - reach)),
            torch.minimum(state.upper, up(state.centre + reach)))


# Registered activations compute in float64 with their own rounding, which the pass cannot see; it
# assumes an error of at most this relative amount (plus ACTIVATION_ATOL) and widens by it.
ACTIVATION_RTOL = 2.0 ** -40
ACTIVATION_ATOL = 2.0 ** -1000


def widened(t, sign):
    """``t`` moved by an activation's assumed rounding error, down (sign -1) or up (sign +1)."""
    step = up(t.abs() * ACTIVATION_RTOL + ACTIVATION_ATOL)
    return down(t - step) if sign < 0 else up(t + step)


def float64_copy(model):
    """An exact float64 copy of ``model`` (every float32/16 value is a float64), on its device."""
    return copy.deepcopy(model).double()


@contextlib.contextmanager
def exact_float64_kernels(device, rigorous):
    """Within a rigorous pass on CUDA, convolutions by plain sums of products (cuDNN may choose
    FFT or Winograd algorithms, whose error is not the summation bound the slack assumes)."""
    if rigorous and torch.device(device).type == 'cuda':
        with torch.backends.cudnn.flags(enabled=False):
            yield
    else:
        yield
