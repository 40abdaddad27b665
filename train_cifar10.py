"""Certified training on CIFAR-10 (docs/method.md §4-5). ``python train_cifar10.py --help`` lists the flags."""
import functools

import trainer
import utils

parse = functools.partial(utils.argparser, data='cifar10', model='c6f2_relux', epochs=800, warmup=20,
                          rampup=400, epsilon=36 / 255, epsilon_train=0.1551)

if __name__ == '__main__':
    trainer.main(parse)
