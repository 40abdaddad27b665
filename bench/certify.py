"""Certification speed and what the guarantee costs, side by side on the same weights and images.

* authors: power iteration (``--test_sniter`` 2000 rounds, one early stop for the whole batch when
  no vector moves by 1e-3), ``--test_opt_iter`` 1000 rounds of clip-and-rescale on the pairwise
  B x C x C layout (``settings.AUTHORS`` with ``layout='pairwise'``): an estimate;
* lanczos: Lanczos with per-sample stopping and the exact last-layer solver on the label column
  (``settings.LANCZOS``): an estimate;
* guaranteed: the default of every reported certificate (``settings.CERTIFIED``): upper bounds,
  each certificate failing with probability at most 1e-9.

All three run in one process, taking turns per batch; the estimates start from the same random
vectors and the same (converged) global power-iteration vectors. The table gives images per
second, the peak memory above the start of each run (host: peak resident set, VmHWM reset per run;
CUDA: max_memory_allocated), the certified counts, the speed-up over the authors' procedure, the
agreement of the certified sets with theirs, and for the first ``--truth`` images the largest
relative amount by which each procedure's Lipschitz product is below the converged one (float64
norms of the same masks, ``local_bound.layer_norms(precise=True)``; > 0 is the unsafe side).

Weights: ``--checkpoint MODEL=PATH`` (e.g. the authors' ``cifar_6C2F_best.pth``); otherwise a
short training (cached under ``runs/``) on the real CIFAR-10 training images of ``--subset`` (an
.npz with uint8 ``x`` [N, 3, 32, 32] and ``y``: the first N - 660 train, the last 660 are the test
images), or on synthetic CIFAR-sized images without it. Test images: the official test set with
``--data_dir``, else the subset's last 660, else synthetic ones.

    python bench/certify.py --images 128 --batch 128 --models c6f2_relux --eps 0.02 \\
        --subset ../shared/data/cifar10-subset/cifar10_train_subset.npz
    python bench/certify.py --device cuda --checkpoint c6f2_relux=pretrained/relu/cifar_6C2F_best.pth \\
        --data_dir data/
"""
import argparse
import os
import time

import common  # noqa: F401  (puts the repository on sys.path)
import torch
import torch.nn.functional as F

from common import (device_peak_bytes, host_peak_bytes, host_rss_bytes, machine_lines, print_table,
                    reset_device_peak, reset_host_peak, sync)
import checkpoints
import local_bound
import settings
import spectral
import utils

PROCEDURES = {"authors' procedure": settings.AUTHORS.replace(layout='pairwise'),
              'lanczos (estimate)': settings.LANCZOS,
              'guaranteed (default)': settings.CERTIFIED}
SUBSET_TEST = 660


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu')
    p.add_argument('--models', default='c6f2_relux,c6f2_clmaxmin')
    p.add_argument('--eps', default='0.02,0.1412', help='comma-separated radii (36/255 = 0.1412)')
    p.add_argument('--batch', type=int, default=256)
    p.add_argument('--images', type=int, default=256, help='test images per configuration')
    p.add_argument('--test_sniter', type=int, default=2000)
    p.add_argument('--test_opt_iter', type=int, default=1000)
    source_flags(p)
    p.add_argument('--truth', type=int, default=16, help='images whose products are checked against converged norms')
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--seed', type=int, default=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data and weights

def source_flags(p):
    """The flags that say where the weights (``load_weights``) and the images (``test_images``) come
    from; bench/refined.py reads the same ones."""
    p.add_argument('--checkpoint', action='append', default=[], metavar='MODEL=PATH')
    p.add_argument('--data_dir', default=None, help='real CIFAR-10 test images from here')
    p.add_argument('--subset', default=None, help='.npz of real CIFAR-10 images to train on and test (see above)')
    p.add_argument('--train_steps', type=int, default=400, help='training steps without a checkpoint')
    p.add_argument('--train_eps', type=float, default=0.1)
    p.add_argument('--cache', default='runs', help='where the short-trained weights are kept')


def synthetic(count, seed, device):
    """CIFAR-sized images: one smooth random template per class, plus noise, in [0, 1]."""
    gen = torch.Generator().manual_seed(1234)
    templates = F.interpolate(torch.randn(10, 3, 4, 4, generator=gen), size=(32, 32), mode='bilinear',
                              align_corners=False)
    gen.manual_seed(seed)
    y = torch.randint(0, 10, (count,), generator=gen)
    x = (0.5 + 0.2 * templates[y] + 0.1 * torch.randn(count, 3, 32, 32, generator=gen)).clamp(0, 1)
    return x.to(device), y.to(device)


def real_test_images(data_dir, count, device):
    import data_load
    _, test_set = data_load.build_datasets('cifar10', data_dir, augmentation=False, download=False)
    xs, ys = zip(*(test_set[i] for i in range(count)))
    return torch.stack(xs).to(device), torch.tensor(ys).to(device)


def subset_images(path, device):
    """((train x, y), (test x, y)) of the .npz subset: all but the last SUBSET_TEST images train."""
    import numpy as np
    arrays = np.load(path)
    x = torch.from_numpy(arrays['x']).float().div(255)
    y = torch.from_numpy(arrays['y']).long()
    return ((x[:-SUBSET_TEST].to(device), y[:-SUBSET_TEST].to(device)),
            (x[-SUBSET_TEST:].to(device), y[-SUBSET_TEST:].to(device)))


def test_images(args, device):
    """(x, y, a line saying where they come from): the official test set with ``--data_dir``, else the
    subset's held-out images, else synthetic ones."""
    if args.data_dir:
        x, y = real_test_images(args.data_dir, args.images, device)
        return x, y, f'the first {args.images} CIFAR-10 test images from {args.data_dir}'
    if args.subset:
        x, y = (t[:args.images] for t in subset_images(args.subset, device)[1])
        return x, y, (f'{len(y)} real CIFAR-10 training images held out of the subset ({args.subset}); '
                      'not the official test set')
    x, y = synthetic(args.images, args.seed + 2, device)
    return x, y, f'{args.images} synthetic CIFAR-sized test images (class templates + noise)'


def train_short(model, steps, eps, device, images):
    """Adam on ``images`` (x, y): a tenth of the steps plain, then the worst-case loss at ``eps``
    (with a little clean loss), so that the Lipschitz bound shrinks quickly."""
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x_all, y_all = images
    for step in range(steps):
        batch = torch.randint(0, len(y_all), (32,), device=device)
        x, y = x_all[batch], y_all[batch]
        if step < steps // 10:
            loss = F.cross_entropy(model(x), y)
        else:
            out = local_bound.bound_outputs(model, x, y, eps, settings.TRAINING)
            loss = 0.1 * F.cross_entropy(out.logits, y) + 0.9 * F.cross_entropy(out.worst, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        local_bound.project_parameters(model)
    return model


def load_weights(name, args, device):
    """(model, where the weights came from)."""
    paths = dict(item.split('=', 1) for item in args.checkpoint)
    if name in paths:
        model, _ = checkpoints.load_model(paths[name], 'cifar10', name, 2.0, device)
        return model.eval(), paths[name]
    torch.manual_seed(args.seed)
    model = utils.select_model('cifar10', name, 2.0, device)
    kind = 'subset' if args.subset else 'synthetic'
    cache = os.path.join(args.cache, f'bench_certify_{name}_{kind}_{args.train_steps}_{args.train_eps}.pth')
    if os.path.exists(cache):
        model.load_state_dict(torch.load(cache, map_location=device))
        return model.eval(), f'{cache} ({kind} training, cached)'
    start = time.perf_counter()
    images = subset_images(args.subset, device)[0] if args.subset else synthetic(4096, args.seed + 1, device)
    train_short(model, args.train_steps, args.train_eps, device, images)
    os.makedirs(args.cache, exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model.eval(), (f'{args.train_steps} training steps on {kind} images at eps {args.train_eps} '
                          f'({time.perf_counter() - start:.0f} s), saved to {cache}')


# ----------------------------------------------------------------------------- measuring

class Run:
    """Totals of one configuration over the batches: seconds, peak memory, outputs."""

    def __init__(self, settings):
        self.settings, self.seconds, self.peak, self.outputs = settings, 0.0, 0, []

    def certify(self, model, x, y, eps, args, starts, global_state, device):
        spectral.load_global_vectors(model, global_state)
        torch.manual_seed(starts)                   # both configurations: the same start vectors
        base = host_rss_bytes()
        reset_host_peak()
        reset_device_peak(device)
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = local_bound.bound_outputs(model, x, y, eps, self.settings)
            certified = local_bound.certified_predictions(out, y)
        sync(device)
        self.seconds += time.perf_counter() - start
        peak = device_peak_bytes(device) if device.type == 'cuda' else host_peak_bytes() - base
        self.peak = max(self.peak, peak)
        self.outputs.append((certified, out.lipschitz))

    def cat(self, k):
        return torch.cat([o[k] for o in self.outputs])


def compare(model, x, y, eps, args, device):
    """Every procedure on ``x`` in batches of ``args.batch``, rotating which goes first; returns
    the runs and the global vectors they all started from.

    The global power-iteration vectors are converged first and every run starts from them: the
    global norms size the boxes and so the masks, which must be the same for both procedures.
    """
    with torch.no_grad():
        local_bound.global_lipschitz(model, sniter=args.test_sniter, input_shape=x.shape[1:])
    global_state = {i: v.clone() for i, v in spectral.global_vectors_state(model).items()}
    runs = {name: Run(s.replace(sniter=args.test_sniter, opt_iter=args.test_opt_iter))
            for name, s in PROCEDURES.items()}
    names = list(runs)
    for k, start in enumerate(range(0, len(y), args.batch)):
        xb, yb = x[start:start + args.batch], y[start:start + args.batch]
        for name in names[k % len(names):] + names[:k % len(names)]:
            runs[name].certify(model, xb, yb, eps, args, args.seed + k, global_state, device)
    return runs, global_state


def converged_products(model, x, eps, args, global_state):
    """The Lipschitz products of the first ``args.truth`` images with converged float64 norms."""
    spectral.load_global_vectors(model, global_state)
    with torch.no_grad():
        norms = local_bound.layer_norms(model, x[:args.truth], eps, settings.AUTHORS.replace(sniter=args.test_sniter),
                                        precise=True, rtol=1e-7)
    return torch.stack(list(norms.values())).double().prod(dim=0)


def under_truth(run, truth):
    """Largest (converged - estimate) / converged over the images with a converged product."""
    estimate = run.cat(1)[:len(truth)].double()
    return ((truth - estimate) / truth.clamp(min=1e-300)).max().item()


def summary_rows(name, eps, runs, count, truth):
    """One table row per procedure: time, memory, certified, speed-up and agreement with the
    authors' procedure, and the largest under-estimate of the converged product."""
    authors = runs["authors' procedure"]
    rows = []
    for label, run in runs.items():
        same = (authors.cat(0) == run.cat(0)).float().mean().item()
        rows.append([name, f'{eps:.4f}', label, f'{run.seconds:.1f}', f'{count / run.seconds:.2f}',
                     f'{run.peak / 2**20:.0f}', f'{int(run.cat(0).sum())}/{count}',
                     f'{authors.seconds / run.seconds:.1f}x', f'{100 * same:.1f}%',
                     f'{under_truth(run, truth):.1e}' if truth is not None else ''])
    return rows


def main(argv=None):
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for line in machine_lines(device):
        print(line)
    x, y, where = test_images(args, device)
    print(f'images: {where}')
    header = ['model', 'eps', 'procedure', 'seconds', 'images/s', 'peak MiB', 'certified', 'speed-up',
              "same sets as the authors'", 'L below converged']
    rows = []
    for name in args.models.split(','):
        model, source = load_weights(name, args, device)
        print(f'{name}: {source}')
        for eps in (float(e) for e in args.eps.split(',')):
            runs, global_state = compare(model, x, y, eps, args, device)
            truth = converged_products(model, x, eps, args, global_state) if args.truth > 0 else None
            rows += summary_rows(name, eps, runs, len(y), truth)
            print_table(header, rows[-len(PROCEDURES):])
    print()
    print_table(header, rows)
    print(f'"L below converged": largest (converged - product) / converged over the first {args.truth} images '
          '(> 0: an under-estimate, the unsafe side; the guaranteed products are upper bounds, < 0). The '
          'guaranteed products are the bounds each decision used (loose where it came at an early check).')


if __name__ == '__main__':
    main()
