#!/usr/bin/env bash
# The authors' recipes (docs/method.md §5), one command each. Run the line you need, e.g.
#   bash run_job.sh cifar_6c2f
# Extra flags are passed through: bash run_job.sh mnist --device cuda:1 --data_dir /datasets
# Multi-GPU: prefix with torchrun, e.g. torchrun --nproc_per_node=4 train_cifar10.py ...
set -euo pipefail
cd "$(dirname "$0")"
job=${1:-help}
shift || true

case "$job" in
  mnist)            # MNIST 4C3F, GloRo loss
    python train_mnist.py --model relux --sniter 5 --init 2.0 --epsilon_train 1.75 --gloro \
      --no_augmentation --opt_iter 10 --prefix mnist_4C3F "$@" ;;
  cifar_4c3f)       # CIFAR-10 4C3F
    python train_cifar10.py --model relux --sniter 2 --init 2.0 --end_lr 1e-6 --prefix cifar_4C3F "$@" ;;
  cifar_6c2f)       # CIFAR-10 6C2F
    python train_cifar10.py --model c6f2_relux --sniter 2 --init 2.0 --end_lr 1e-6 --prefix cifar_6C2F "$@" ;;
  cifar_6c2f_gloro) # CIFAR-10 6C2F with the GloRo loss
    python train_cifar10.py --model c6f2_relux --sniter 2 --init 2.0 --end_lr 1e-6 --gloro \
      --prefix cifar_6C2F_gloro "$@" ;;
  cifar_6c2f_maxmin) # CIFAR-10 6C2F with clipped MaxMin activations
    python train_cifar10.py --model c6f2_clmaxmin --sniter 2 --end_lr 1e-6 --prefix cifar_6C2F_maxmin "$@" ;;
  eval_cifar)       # certify the pretrained CIFAR-10 6C2F model (pretrained/README.md)
    python evaluate.py --data cifar10 --model c6f2_relux --epsilon 0.141 --test_batch_size 256 \
      --test_sniter 2000 --saved_model pretrained/relu/cifar_6C2F "$@" ;;
  eval_mnist)       # certify the pretrained MNIST 4C3F model
    python evaluate.py --data mnist --model relux --epsilon 1.58 --test_batch_size 256 \
      --test_sniter 2000 --saved_model pretrained/relu/mnist_4C3F "$@" ;;
  *)
    echo "usage: bash run_job.sh {mnist|cifar_4c3f|cifar_6c2f|cifar_6c2f_gloro|cifar_6c2f_maxmin|eval_cifar|eval_mnist} [extra flags]"
    echo "TinyImageNet recipes: TinyImagenet/run_job.sh"
    [ "$job" = help ] ;;
esac
