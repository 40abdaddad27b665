"""A stand-in for the published code's training step ("authors' layout"), for side-by-side benchmarks.

It computes the same numbers as ``local_bound.bound_outputs`` (tests/test_fast_path.py checks the
worst-case logits) but organises the work the way the published implementation does, so that a
benchmark against it measures what the design costs, not what a different method costs:

* a separate clean forward of the model for the clean logits;
* the box carried as (mid, rad), re-derived from (lower, upper) after every intersection;
* each activation applied five times (to the box ends, the ball ends and the centre), then the
  two boxes intersected after the activation;
* fixed-neuron masks built with ``zeros_like`` and boolean index assignment;
* global power iteration with an extra operator application to read off sigma (and, for a conv
  whose adjoint shape does not match, a retried ``conv_transpose2d`` every iteration); a Linear
  layer's vector lives in its output space (``v = W^T u/|.|``, ``u = W v/|.|``, sigma ``u^T W v``);
* per-sample power iteration on the masked operator, gradients through every iteration, with an
  extra masked operator application for sigma;
* the full B x C x C pairwise BCP translation with the direction tensor repeated per sample,
  reduced to the label column by a one-hot ``bmm``;
* per-example start vectors in fp32 host memory (pinned when CUDA exists), the batch slice moved
  to the device and back every step;
* (epoch benchmark) data from a ``DataLoader`` with per-sample PIL transforms, one worker.

Written for this project from the description of the method; the global power iteration keeps
its vectors in the same spaces as ours so that both give identical numbers from identical states.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import ClampGroupSort, Flatten, ReLU_x

EPS = 1e-12
LOCAL_TOL = 1e-3
GLOBAL_TOL = 1e-4


def _affine(layer):
    return isinstance(layer, (nn.Conv2d, nn.Linear))


def _flat_norm(t):
    """Per-sample L2 norm, shaped to broadcast against ``t``."""
    if t.dim() > 2:
        return t.reshape(t.size(0), -1).norm(dim=1).view(t.size(0), 1, 1, 1)
    return t.norm(dim=1, keepdim=True)


class AuthorsStore:
    """Start vectors as a list with one fp32 host tensor per layer (None for non-affine layers)."""

    def __init__(self, model, input_shape, num_examples, *, seed=None, pin=None):
        pin = torch.cuda.is_available() if pin is None else pin
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.vectors = []
        x = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
        layers = list(model)
        with torch.no_grad():
            for layer in layers[:-1]:
                if _affine(layer):
                    v = torch.empty((num_examples, *x.shape[1:]), pin_memory=pin)
                    for start in range(0, num_examples, 1024):   # no second full-size copy to pin
                        block = v[start:start + 1024]
                        block.copy_(torch.randn(block.shape, generator=generator))
                    self.vectors.append(v)
                else:
                    self.vectors.append(None)
                x = layer(x)
        self.vectors.append(None)

    @property
    def nbytes(self):
        return sum(v.numel() * v.element_size() for v in self.vectors if v is not None)

    def fetch(self, index, device):
        """The batch slice of every layer, moved to ``device``."""
        return [None if v is None else v[index, :].to(device) for v in self.vectors]

    def put_back(self, index, vectors):
        """Copy the final vectors back to host memory."""
        for k, u in enumerate(vectors):
            if u is not None and self.vectors[k] is not None:
                self.vectors[k][index, :] = u.clone().detach().cpu()


class AuthorsBound:
    """The bound pass in the published code's structure (see the module docstring)."""

    def __init__(self, model):
        self.model = model
        self.layers = list(model)
        kinds = {type(m) for m in self.layers}
        # output masks of the masked operator only for ReLU-family models, as in the method
        self.relu_family = ClampGroupSort not in kinds
        self.global_u = {}

    # ----------------------------------------------------------------- operators
    @staticmethod
    def _apply(layer, x, weight, bias):
        if isinstance(layer, nn.Conv2d):
            return F.conv2d(x, weight, bias, stride=layer.stride, padding=layer.padding)
        return F.linear(x, weight, bias)

    @staticmethod
    def _adjoint(layer, y, like):
        if isinstance(layer, nn.Conv2d):
            out = F.conv_transpose2d(y, layer.weight, stride=layer.stride, padding=layer.padding,
                                     output_padding=0)
            if out.shape[1:] != like.shape[1:]:   # strided conv dropped rows: try again, padded
                out = F.conv_transpose2d(y, layer.weight, stride=layer.stride, padding=layer.padding,
                                         output_padding=1)
            return out
        return F.linear(y, layer.weight.t())

    # ----------------------------------------------------------------- global norm
    def _global_norm(self, k, layer, in_shape, sniter):
        if isinstance(layer, nn.Linear):
            return self._global_norm_linear(k, layer, sniter)
        u = self.global_u.get(k)
        if u is None:
            u = torch.randn(1, *in_shape, device=layer.weight.device)
        zero_bias = torch.zeros_like(layer.bias) if layer.bias is not None else None
        for it in range(sniter):
            out = self._apply(layer, u, layer.weight, zero_bias)
            v = out / (out.norm(2) + EPS)
            previous = u
            back = self._adjoint(layer, v, u)
            u = back / (back.norm(2) + EPS)
            if (u - previous).norm(2) < GLOBAL_TOL or it + 1 == sniter:
                break
        self.global_u[k] = u.data
        sigma = (v * self._apply(layer, u, layer.weight, zero_bias)).reshape(1, -1).sum(1)[0]
        return sigma

    def _global_norm_linear(self, k, layer, sniter):
        """Output-side power iteration of a Linear layer (no EPS); sigma = u^T W v."""
        u = self.global_u.get(k)
        if u is None:
            u = torch.randn(1, layer.out_features, device=layer.weight.device)
        for it in range(sniter):
            previous = u
            v = F.linear(u, layer.weight.t())
            v = v / v.norm(2)
            u = F.linear(v, layer.weight)
            u = u / u.norm(2)
            if (u - previous).norm(2) < GLOBAL_TOL or it + 1 == sniter:
                break
        self.global_u[k] = u.data
        return (u * F.linear(v, layer.weight)).sum()

    # ----------------------------------------------------------------- masks
    @staticmethod
    def _mask_relux(mid, rad, theta):
        saturated, dead, varying = torch.zeros_like(mid), torch.zeros_like(mid), torch.ones_like(mid)
        saturated[mid - rad > theta] = 1.0
        dead[mid + rad <= 0] = 1.0
        varying -= saturated + dead
        return varying

    @staticmethod
    def _mask_relu(mid, rad):
        dead, varying = torch.zeros_like(mid), torch.ones_like(mid)
        dead[mid + rad <= 0] = 1.0
        varying -= dead
        return varying

    @staticmethod
    def _mask_maxmin(mid, rad, layer):
        low_end, high_end = mid - rad, mid + rad
        varying = torch.ones_like(mid)
        max_lower, min_lower = low_end.split(low_end.size(1) // 2, 1)
        _, min_upper = high_end.split(high_end.size(1) // 2, 1)
        top = torch.zeros_like(max_lower)
        top[max_lower >= layer.max] = 1.0
        bottom = torch.zeros_like(min_lower)
        bottom[min_upper <= layer.min] = 1.0
        varying -= torch.cat([top, bottom], dim=1)
        return varying

    # ----------------------------------------------------------------- activations
    @staticmethod
    def _relux(x, theta):
        return torch.max(torch.zeros_like(x), torch.min(x, theta))

    @staticmethod
    def _maxmin(x, layer):
        a, b = x.split(x.size(1) // 2, 1)
        return torch.cat([torch.min(torch.max(a, b), layer.max), torch.max(torch.min(a, b), layer.min)], 1)

    # ----------------------------------------------------------------- the pass
    def forward(self, x, eps, u_data, sniter):
        """Returns (logits, penultimate centre, local radius, box mid, box rad, last weight, u_data)."""
        batch = x.size(0)
        mu = x.clone()
        r = eps * torch.ones(batch, device=x.device)
        box_mid, box_rad = mu, eps * torch.ones(x.size(), device=x.device)
        masks = [None] * len(self.layers)
        in_shapes = [None] * len(self.layers)
        in_shapes[0] = mu.size()
        for k, layer in enumerate(self.layers):
            if k + 1 == len(self.layers):
                norms = self._local_norms(masks, in_shapes, u_data, sniter)
                radius = 1.0
                for sigma in norms:
                    radius = radius * sigma
                radius = radius * eps
                logits = F.linear(mu, layer.weight, layer.bias)
                F.linear(box_mid, layer.weight.abs(), None)   # computed and unused upstream
                return logits, mu, radius, box_mid, box_rad, layer.weight, u_data
            if _affine(layer):
                mu, r, box_mid, box_rad = self._affine_step(k, layer, mu, r, box_mid, box_rad, sniter)
                nxt = self.layers[k + 1]
                if isinstance(nxt, ReLU_x):
                    masks[k] = self._mask_relux(box_mid, box_rad, nxt.threshold)
                elif isinstance(nxt, nn.ReLU):
                    masks[k] = self._mask_relu(box_mid, box_rad)
            elif isinstance(layer, ReLU_x):
                masks[k] = masks[k - 1]
                mu, box_mid, box_rad = self._monotone_step(lambda t: self._relux(t, layer.threshold),
                                                           mu, r, box_mid, box_rad)
            elif isinstance(layer, nn.ReLU):
                masks[k] = masks[k - 1]
                mu, box_mid, box_rad = self._monotone_step(F.relu, mu, r, box_mid, box_rad)
            elif isinstance(layer, ClampGroupSort):
                mu, box_mid, box_rad = self._monotone_step(lambda t: self._maxmin(t, layer),
                                                           mu, r, box_mid, box_rad)
                masks[k] = self._mask_maxmin(box_mid, box_rad, layer)
            elif isinstance(layer, (Flatten, nn.Flatten)):
                masks[k] = masks[k - 1].reshape(mu.size(0), -1)
                mu, box_mid, box_rad = (t.reshape(t.size(0), -1) for t in (mu, box_mid, box_rad))
            else:
                raise TypeError(type(layer).__name__)
            in_shapes[k + 1] = mu.size()

    def _affine_step(self, k, layer, mu, r, box_mid, box_rad, sniter):
        box_mid = self._apply(layer, box_mid, layer.weight, layer.bias)
        box_rad = self._apply(layer, box_rad, layer.weight.abs(), None)
        upper, lower = box_mid + box_rad, box_mid - box_rad
        centre = self._apply(layer, mu, layer.weight, layer.bias)
        sigma = self._global_norm(k, layer, mu.shape[1:], sniter)
        row_norms = layer.weight.reshape(layer.weight.size(0), -1).norm(2, dim=-1)
        if centre.dim() > 2:
            ball = r.view(-1, 1, 1, 1) * torch.ones_like(centre) * row_norms.view(1, -1, 1, 1)
        else:
            ball = r.view(-1, 1) * row_norms.view(1, -1).repeat(centre.size(0), 1)
        upper = torch.min(upper, centre + ball)
        lower = torch.max(lower, centre - ball)
        return centre, r * sigma, (upper + lower) / 2, (upper - lower) / 2

    @staticmethod
    def _monotone_step(act, mu, r, box_mid, box_rad):
        upper, lower = act(box_mid + box_rad), act(box_mid - box_rad)
        box_mid, box_rad = (upper + lower) / 2, (upper - lower) / 2
        spread = r.view(-1, *([1] * (mu.dim() - 1)))
        upper = torch.min(upper, act(mu + spread))
        lower = torch.max(lower, act(mu - spread))
        return act(mu), (upper + lower) / 2, (upper - lower) / 2

    def _local_norms(self, masks, in_shapes, u_data, sniter):
        norms = []
        for k, layer in enumerate(self.layers[:-1]):
            if not _affine(layer):
                continue
            if u_data:
                u = u_data[k]
            else:
                u = torch.randn(*in_shapes[k], device=layer.weight.device)
            in_mask = masks[k - 1] if k > 0 else None
            out_mask = masks[k] if self.relu_family else None
            for it in range(sniter):
                previous = u
                if in_mask is not None:
                    u = u * in_mask
                out = self._apply(layer, u, layer.weight, None)
                if out_mask is not None:
                    out = out * out_mask
                v = out / (_flat_norm(out) + EPS)
                back = self._adjoint(layer, v, u)
                if in_mask is not None:
                    back = back * in_mask
                u = back / (_flat_norm(back) + EPS)
                moved = (u - previous).reshape(u.size(0), -1).norm(dim=1)
                if moved.max() < LOCAL_TOL or it + 1 == sniter:
                    if u_data:
                        u_data[k] = u
                    break
            if in_mask is not None:
                u = u * in_mask
            out = self._apply(layer, u, layer.weight, None)
            if out_mask is not None:
                out = out * out_mask
            norms.append((v * out).reshape(v.size(0), -1).sum(1))
        return norms


def pairwise_bcp(centre, radius, box_mid, box_rad, weight, opt_iter):
    """All B x C x C clip-and-rescale problems with the direction tensor repeated per sample."""
    classes, hidden = weight.size()
    batch = centre.size(0)
    ones = torch.ones((1, classes, classes, 1), device=weight.device)
    eye = torch.eye(classes, classes, device=weight.device).view(1, classes, classes, 1)
    off = ((ones - eye) == 1).float()
    pairs = (weight.view(classes, 1, -1).repeat(1, classes, 1) - weight.repeat(classes, 1, 1)).unsqueeze(0)
    pairs_rep = pairs.repeat(batch, 1, 1, 1)
    r = radius.view(batch, 1, 1, 1)
    d = r * F.normalize(pairs, p=2, dim=-1)
    target = off * (r + EPS) + EPS
    c = centre.view(batch, 1, 1, hidden)
    upper = box_mid.view(batch, 1, 1, hidden) + box_rad.view(batch, 1, 1, hidden) - c
    lower = box_mid.view(batch, 1, 1, hidden) - box_rad.view(batch, 1, 1, hidden) - c
    if upper.min() < 0 or lower.max() > 0:
        upper[upper < 0] = 0
        lower[lower > 0] = 0
    it = 0
    while it == 0 or (((off * d < lower) + (off * d > upper)).sum() > 0 and it < opt_iter):
        it += 1
        low_hit, high_hit = (d <= lower).float(), (d >= upper).float()
        before = off * d * low_hit + off * d * high_hit
        after = off * lower * low_hit + off * upper * high_hit
        norm_before = (off * (before + EPS)).norm(2, dim=-1, keepdim=True)
        norm_after = (off * (after + EPS)).norm(2, dim=-1, keepdim=True)
        free_before = (torch.clamp(target.abs() ** 2 - norm_before.abs() ** 2, min=0) + EPS + eye).sqrt()
        free_after = (torch.clamp(target.abs() ** 2 - norm_after.abs() ** 2, min=0) + EPS + eye).sqrt()
        inside = ((d > lower) * (d < upper)).float()
        d = after + (free_after / (free_before + EPS)) * off * d * inside
        products = (pairs_rep * d).sum(-1)
    return products


def worst_logits(logits, table, y, gloro=False):
    """Label column of the B x C x C table by a one-hot bmm; optional GloRo bottom logit."""
    batch, classes = logits.shape
    onehot = torch.zeros(batch, classes, device=logits.device).scatter_(1, y.view(-1, 1), 1.0)
    column = table.bmm(onehot.unsqueeze(2)).view(batch, classes)
    worst = logits + column * (1 - onehot)
    if not gloro:
        return worst
    worst = worst.clone()
    worst[torch.arange(batch), y] -= float('inf')
    return torch.cat([logits, worst.max(dim=1, keepdim=True)[0]], dim=1)


def authors_bound(bound, x, y, eps, u_data, sniter, opt_iter, gloro=False):
    """(clean logits of the pass, worst-case logits, u_data) as the published pipeline computes them."""
    logits, centre, radius, box_mid, box_rad, weight, u_data = bound.forward(x, eps, u_data, sniter)
    table = pairwise_bcp(centre, radius, box_mid, box_rad, weight, opt_iter)
    table[table != table] = 0
    return logits, worst_logits(logits, table, y, gloro), u_data


class AuthorsTrainer:
    """One training step in the published layout: clean forward, bound pass, host store round trip."""

    def __init__(self, model, optimizer, store, *, sniter, opt_iter, gloro=False, device='cpu'):
        self.model, self.optimizer, self.store = model, optimizer, store
        self.bound = AuthorsBound(model)
        self.sniter, self.opt_iter, self.gloro = sniter, opt_iter, gloro
        self.device = torch.device(device)

    def step(self, x, y, index, eps, kappa):
        """Returns (clean CE, robust CE, clean error, robust error) as Python numbers."""
        self.model.train()
        x, y = x.to(self.device), y.to(self.device)
        out = self.model(x)
        ce = nn.CrossEntropyLoss()(out, y)
        err = (out.max(1)[1] != y).float().sum() / x.size(0)
        u_data = self.store.fetch(index, self.device) if self.store is not None else []
        _, worst, u_data = authors_bound(self.bound, x, y, eps, u_data, self.sniter, self.opt_iter, self.gloro)
        if self.store is not None:
            self.store.put_back(index, u_data)
        robust = nn.CrossEntropyLoss()(worst, y)
        robust_err = (worst.max(1)[1].data != y).float().sum() / x.size(0)
        loss = robust if self.gloro else kappa * ce + (1 - kappa) * robust
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        for layer in self.model:
            if isinstance(layer, ReLU_x):
                layer.threshold.data = torch.clamp(layer.threshold.data, 0.)
        return ce.item(), robust.detach().item(), err.item(), robust_err.item()
