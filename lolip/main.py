"""lolip command line: train a model of the original's grammar, attack it, measure its local
Lipschitzness, write one JSON and print one table (docs/method_lolip.md §1).

    python lolip/main.py --experiment experiment01 --no-hooks --norm inf --eps 0.1 \
        --dataset mnist --model ce-tor-CNN001 --attack pgd --random_seed 0 --data_dir DIR
"""
import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import checkpoints  # noqa: E402
import data_load  # noqa: E402
import norms  # noqa: E402
import utils  # noqa: E402
from lolip import data, recipe, report, train  # noqa: E402
from lolip.adversaries import build_attack  # noqa: E402
from lolip.archs import build_model  # noqa: E402
from lolip.grammar import GrammarError, parse_model  # noqa: E402
from lolip.objectives import build_objective  # noqa: E402

EXPERIMENTS = ('experiment01', 'hypo', 'restrictedImgnet')


def parser():
    p = utils.OneLineParser(prog='lolip/main.py', description=__doc__.split('\n\n')[0])
    p.add_argument('--experiment', required=True, choices=EXPERIMENTS,
                   help='names the output folder (all run the same pipeline)')
    p.add_argument('--no-hooks', action='store_true', help="accepted (the original's framework)")
    p.add_argument('--norm', required=True, choices=('inf', '2'), help='attack and ball norm')
    p.add_argument('--eps', required=True, type=float, help='radius of the ball')
    p.add_argument('--dataset', required=True, choices=data.DATASETS, help='data set')
    p.add_argument('--model', required=True, help='[AUG-]LOSS-tor-ARCH[-HYPER], e.g. ce-tor-CNN001')
    p.add_argument('--attack', required=True, choices=('pgd', 'multitarget'), help='attack of the evaluation')
    p.add_argument('--random_seed', type=int, default=0, help='seed of training and the attacks')
    p.add_argument('--as_published', action=argparse.BooleanOptionalAction, default=True,
                   help="LLR's zeroed gradient and TULIP's doubled CE gradient as in the original "
                        "code; --no-as_published: the papers' formulas")
    p.add_argument('--data_dir', default='data/', help='where the data sets are')
    p.add_argument('--download', action=argparse.BooleanOptionalAction, default=True,
                   help='download MNIST/CIFAR-10/SVHN when absent (needs network)')
    p.add_argument('--out_dir', default='runs', help='results go to OUT_DIR/EXPERIMENT/')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='cuda when available, else cpu')
    p.add_argument('--epochs', type=int, help="training epochs (default: the recipe's, or --model's epN)")
    p.add_argument('--limit_train', type=int, help='use the first N training examples (default: all)')
    p.add_argument('--limit_test', type=int, help='use the first N test examples (default: all)')
    p.add_argument('--resume', action='store_true', help="continue this run's checkpoint")
    return p


def check_args(p, args):
    """Parses --model and checks the numbers; returns the ModelSpec."""
    if not args.eps > 0:
        p.error('--eps must be positive')
    for flag in ('epochs', 'limit_train', 'limit_test'):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f'--{flag} must be at least 1')
    try:
        torch.device(args.device)
    except RuntimeError as error:
        p.error(f'--device {args.device!r}: {error}')
    try:
        spec = parse_model(args.model)
    except GrammarError as error:
        p.error(str(error))
    if spec.arch in ('CNN001', 'CNN002') and args.dataset != 'mnist':
        p.error(f'{spec.arch} takes 28x28 MNIST digits; use WRN_40_10 or ResNet50 for {args.dataset}')
    return spec


def run_name(args, spec):
    """The file stem of a run: data set, norm, eps, model, attack, seed (and -corrected)."""
    corrected = '-corrected' if not args.as_published and spec.objective in ('llr', 'tulip') else ''
    return (f'{args.dataset}-{args.norm}-{args.eps:g}-{args.model}-{args.attack}-'
            f'{args.random_seed}{corrected}')


def run(args, spec):
    """Train (or resume), evaluate, write the JSON; returns (result, json path)."""
    train.seed_everything(args.random_seed)
    norm = norms.order(args.norm)
    dataset = data.load(args.dataset, args.data_dir, aug=spec.aug, limit_train=args.limit_train,
                        limit_test=args.limit_test, download=args.download)
    model = build_model(spec.arch, dataset.num_classes, dataset.shape[0]).to(args.device)
    setting = recipe.recipe_for(args.dataset, spec)
    optimizer = recipe.make_optimizer(setting, model.parameters())
    scheduler = recipe.make_scheduler(setting, optimizer)
    stem = os.path.join(args.out_dir, args.experiment, run_name(args, spec))
    meta = {'model': args.model, 'dataset': args.dataset, 'norm': args.norm, 'eps': args.eps,
            'as_published': args.as_published}
    epochs = args.epochs or setting.epochs
    history = train.fit(model, dataset, build_objective(spec, args.eps, norm, args.as_published),
                        optimizer, scheduler, epochs=epochs, batch_size=setting.batch_size,
                        device=args.device, checkpoint=f'{stem}.pth', meta=meta,
                        resume=args.resume and os.path.isfile(f'{stem}.pth'))
    attack = build_attack(args.attack, args.eps, norm, dataset.num_classes)
    figures = report.evaluate(model, dataset.train_eval, dataset.test, attack, args.eps, norm,
                              args.device, seed=args.random_seed)
    result = {**meta, 'experiment': args.experiment, 'attack': args.attack,
              'random_seed': args.random_seed, 'epochs': epochs, 'recipe': vars(setting),
              'train_examples': len(dataset.train), 'test_examples': len(dataset.test),
              'checkpoint': f'{stem}.pth', 'history': history, **figures}
    report.write_json(result, f'{stem}.json')
    return result, f'{stem}.json'


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    spec = check_args(p, args)
    try:
        result, path = run(args, spec)
    except (data_load.DataNotFoundError, checkpoints.CheckpointError) as error:
        utils.exit_user_error(error)
    except KeyboardInterrupt:
        print('interrupted; run again with --resume to continue from the last epoch', file=sys.stderr)
        sys.exit(130)
    print(report.table(result))
    print(f'results: {path}')
    return result


if __name__ == '__main__':
    main()
