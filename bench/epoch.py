"""Seconds per training epoch and peak memory: authors' layout vs ours, on synthetic CIFAR-10-sized data.

Each configuration is built from scratch in its own phase (model copy, data pipeline, per-example
store), warmed up for a few steps, then timed over one full epoch; peak host memory (this
process's resident set, reset at the start of the phase) and peak device memory are read at its
end, and the configuration is freed before the next phase. Phases alternate (A, B, B, A, ...).

* authors' layout: DataLoader with per-image PIL transforms (random crop + flip, ToTensor), one
  worker; fp32 store in pinned host memory, batch slice to the device and back every step.
* ours: ``loaders.build_loaders`` (uint8 images on the device, batched crop + flip there) and
  ``trainer.make_store`` (float16 on the GPU when it fits), ``trainer.train_robust_epoch``.

    python bench/epoch.py --device cuda                 # 50,000 examples, batch 256, sniter 2
    python bench/epoch.py --device cpu --examples 1024  # CPU default is 1024 examples
"""
import argparse
import gc
import time

import common  # noqa: F401  (puts the repository on sys.path)
import numpy as np
import torch
from PIL import Image
from torchvision import transforms

import data_load
import loaders
import ranks
import utils
from common import (Authors, Ours, device_peak_bytes, gib, host_peak_bytes, host_rss_bytes, machine_lines, make_args,
                    print_table, reset_device_peak, reset_host_peak, sync)


class SyntheticCIFAR(torch.utils.data.Dataset):
    """Random uint8 32x32 RGB images laid out like torchvision's CIFAR10 (``.data`` NHWC, ``.targets``)."""

    def __init__(self, count, transform=None, seed=0, classes=10, size=32):
        rng = np.random.default_rng(seed)
        self.data = rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
        self.targets = rng.integers(0, classes, size=count).tolist()
        self.transform = transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        image = Image.fromarray(self.data[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def authors_loader(train_set, batch_size, device):
    """The published pipeline: per-image PIL transforms in a DataLoader with one worker."""
    augment = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                  transforms.ToTensor()])
    dataset = SyntheticCIFAR(0)
    dataset.data, dataset.targets, dataset.transform = train_set.data, train_set.targets, augment
    return torch.utils.data.DataLoader(data_load.IndexedDataset(dataset), batch_size=batch_size, shuffle=True,
                                       num_workers=1, pin_memory=device.type == 'cuda')


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cpu', 'cuda'])
    p.add_argument('--model', default='c6f2_relux', choices=['relux', 'c6f2_relux', 'c6f2_clmaxmin'])
    p.add_argument('--batch_size', type=int, default=256)
    p.add_argument('--sniter', type=int, default=2)
    p.add_argument('--opt_iter', type=int, default=1)
    p.add_argument('--examples', type=int, default=None, help='training examples (default 50,000 on cuda, 1024 on cpu)')
    p.add_argument('--repeats', type=int, default=1, help='timed epochs per configuration (phases alternate)')
    p.add_argument('--warmup_steps', type=int, default=3, help='untimed steps before each timed epoch')
    p.add_argument('--only', choices=['authors', 'ours'], default=None, help='run one configuration')
    p.add_argument('--flags', default='', help='extra training flags for ours, e.g. "--power_grad unrolled"')
    p.add_argument('--quick', action='store_true', help='512 examples, batch 128')
    args = p.parse_args(argv)
    if args.examples is None:
        args.examples = 50_000 if args.device == 'cuda' else 1024
    if args.quick:
        args.examples, args.batch_size = min(args.examples, 512), min(args.batch_size, 128)
    return args


def run_phase(kind, opts, args, runtime, data, base_state):
    """Build configuration ``kind``, warm it up, time one epoch; returns a result dict."""
    free_caches(runtime.device)
    reset_device_peak(runtime.device)
    rss_before = host_rss_bytes()
    reset_host_peak()
    start = time.perf_counter()
    model = utils.select_model(args.data, args.model, args.init, runtime.device)
    model.load_state_dict(base_state)
    if kind == 'ours':
        loader = loaders.build_loaders(args, runtime, data, data)[0]
        config = Ours(model, args, runtime, len(data))
    else:
        loader = authors_loader(data, opts.batch_size, runtime.device)
        config = Authors(model, args, runtime, len(data))
    sync(runtime.device)
    setup = time.perf_counter() - start
    eps, kappa = args.epsilon_train, 0.5
    for i, (x, y, index) in enumerate(loader):   # warm-up steps (allocator, cuDNN plans, workers)
        if i >= opts.warmup_steps:
            break
        config.step(x.to(runtime.device), y.to(runtime.device), index, eps, kappa)
    sync(runtime.device)
    start = time.perf_counter()
    config.epoch(loader, eps, kappa)
    sync(runtime.device)
    seconds = time.perf_counter() - start
    result = dict(name=config.name, store=config.store_line(), seconds=seconds, steps=len(loader), setup=setup,
                  host_peak=host_peak_bytes(), host_before=rss_before,
                  device_peak=device_peak_bytes(runtime.device))
    del config, loader, model
    free_caches(runtime.device)
    return result


def free_caches(device):
    """Give cached device memory and cached pinned host memory back, so the next phase starts clean."""
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        if hasattr(torch._C, '_host_emptyCache'):
            torch._C._host_emptyCache()


def main(argv=None):
    opts = parse(argv)
    device = torch.device(opts.device)
    args = make_args(opts.model, opts.batch_size, opts.sniter, opts.opt_iter, device, opts.flags.split())
    runtime = ranks.Runtime(device)
    data = SyntheticCIFAR(opts.examples)
    torch.manual_seed(0)
    base_state = {k: v.clone() for k, v in utils.select_model(args.data, args.model, args.init).state_dict().items()}
    kinds = [opts.only] if opts.only else ['ours', 'authors']   # ours first: its host peak is measured clean
    order = []
    for r in range(opts.repeats):
        order += kinds if r % 2 == 0 else kinds[::-1]
    results = [run_phase(kind, opts, args, runtime, data, base_state) for kind in order]

    print(f'# training epoch: {opts.model}, {opts.examples} synthetic CIFAR-10-sized examples, batch {opts.batch_size}, '
          f'sniter {opts.sniter}, opt_iter {opts.opt_iter}, {opts.device}')
    for line in machine_lines(device):
        print(f'# {line}')
    print(f'# {opts.repeats} timed epoch(s) per configuration (median) after {opts.warmup_steps} warm-up steps; '
          f'phases in order {", ".join(r["name"] for r in results)}; peak host = resident memory of this process '
          f'in the configuration\'s first phase (DataLoader worker not included)')
    header = ['configuration', 'store', 's/epoch', 'steps', 's/step', 'setup s', 'peak host GiB']
    if device.type == 'cuda':
        header.append('peak device GiB')
    rows = []
    names = [n for n in (Authors.name, Ours.name) if any(r['name'] == n for r in results)]
    medians = {n: float(np.median([r['seconds'] for r in results if r['name'] == n])) for n in names}
    base = medians[names[0]]
    for name in names:
        mine = [r for r in results if r['name'] == name]
        seconds = medians[name]
        row = [name, mine[0]['store'], f'{seconds:.1f} ({seconds / base:.2f}x)', mine[0]['steps'],
               f'{seconds / mine[0]["steps"]:.3f}', f'{np.median([r["setup"] for r in mine]):.1f}',
               gib(mine[0]['host_peak'])]
        if device.type == 'cuda':
            row.append(gib(max(r['device_peak'] for r in mine)))
        rows.append(row)
    print_table(header, rows)
    return results


if __name__ == '__main__':
    main()
