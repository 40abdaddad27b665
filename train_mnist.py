"""Certified training on MNIST (docs/method.md §4-5). ``python train_mnist.py --help`` lists the flags."""
import functools

import trainer
import utils

parse = functools.partial(utils.argparser, data='mnist', model='relux', epochs=300, warmup=0,
                          rampup=150, epsilon=1.58, epsilon_train=1.58)

if __name__ == '__main__':
    trainer.main(parse)
