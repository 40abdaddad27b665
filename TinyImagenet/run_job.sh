#!/usr/bin/env bash
# The authors' TinyImageNet recipes (docs/method.md §5), launched with torchrun, one process per GPU:
#   bash TinyImagenet/run_job.sh relux                     (NPROC=4 GPUs on this machine)
#   NPROC=2 bash TinyImagenet/run_job.sh maxmin --data_dir /datasets
# Several machines: on every one, NNODES=<machines> RDZV_ENDPOINT=<host:port of one of them>
# bash TinyImagenet/run_job.sh relux (torchrun's c10d rendezvous numbers the machines).
# Extra flags are passed through. --batch_size is per process: 4 GPUs x 32 as the authors ran it.
# Data first: bash TinyImagenet/data/tinyimagenet.sh data/
set -euo pipefail
cd "$(dirname "$0")/.."
job=${1:-help}
shift || true

launch=(torchrun --nproc_per_node="${NPROC:-4}")
if [ -n "${NNODES:-}" ]; then
  launch+=(--nnodes="$NNODES" --rdzv_backend=c10d --rdzv_id="${RDZV_ID:-tiny}"
           --rdzv_endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port (a machine of the job)}")
fi

case "$job" in
  relux)        # 8C2F with ReLU_theta
    "${launch[@]}" TinyImagenet/train_tiny_multi.py --warmup 0 --model tinyimagenet_relux --batch_size 32 \
      --rampup 125 --sniter 1 --init 1.0 --epochs 250 --sparse 0.01 --indices 0,6,12,14,17 \
      --epsilon_train 0.16 --lr 2.5e-4 --lr_scheduler exp --prefix tiny_8C2F "$@" ;;
  maxmin)       # 8C2F with clipped MaxMin
    "${launch[@]}" TinyImagenet/train_tiny_multi.py --warmup 0 --model tiny_clmaxmin --batch_size 32 \
      --rampup 125 --sniter 3 --epochs 250 --sparse 0.01 --indices 0,6,12,14,17 \
      --epsilon_train 0.16 --lr 1e-4 --prefix tiny_8C2F "$@" ;;
  eval_relux)   # certify a ReLU_theta model (default: the authors', see pretrained/README.md)
    "${launch[@]}" TinyImagenet/evaluate_tiny.py --model tinyimagenet_relux --epsilon 0.141 \
      --test_sniter 2000 --saved_model pretrained/relu/tiny_8C2F "$@" ;;
  eval_maxmin)  # certify a MaxMin model
    "${launch[@]}" TinyImagenet/evaluate_tiny.py --model tiny_clmaxmin --epsilon 0.141 \
      --test_sniter 2000 --saved_model pretrained/maxmin/tiny_8C2F "$@" ;;
  *)
    echo "usage: [NPROC=4] [NNODES=2 RDZV_ENDPOINT=host:port] bash TinyImagenet/run_job.sh {relux|maxmin|eval_relux|eval_maxmin} [extra flags]"
    echo "own runs are saved as pretrained/tiny_8C2F_<model>; evaluate one with --saved_model pretrained/tiny_8C2F_tinyimagenet_relux"
    [ "$job" = help ] ;;
esac
