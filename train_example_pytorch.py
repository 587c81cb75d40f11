#!/usr/bin/env python3
"""Train a CTR model with PyTorch (flags identical to train_example_tensorflow.py).

    python train_example_pytorch.py --model DeepFM                  # embedded synthetic data, CPU
    python train_example_pytorch.py --model DeepFM --data data/criteo --epochs 100 --batch_size 4096 \\
        --optimizer Adam --loss BCE --gpu_ids '1, 2, 3, 4' --lr 0.001 --embed_size 8 \\
        --model_save_dir ./checkpoints/DeepFM/
    torchrun --nproc_per_node 2 train_example_pytorch.py --model DeepFM   # DistributedDataParallel

Prints tqdm progress on stderr and, as the LAST stdout line, one JSON object with
test_auc, test_logloss, epochs, train_rows_per_s, checkpoint (and bayes_auc /
auc_gap on synthetic data).  Bad flags: one line ``error: --flag: ...`` on
stderr, exit status 2.  ``--help`` lists every flag.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common.runtime import configure_process  # noqa: E402

# before torch starts its threads: idle OpenMP threads sleep, and malloc reuses large blocks
# (see common/runtime.py; CTR_ZOO_PROCESS_TUNING=0 turns both off)
configure_process()

from common.errors import cli_errors  # noqa: E402
from common.flags import parse_args, resolve_data  # noqa: E402


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    with cli_errors():
        args = parse_args(argv, "pytorch")        # validated before torch is even imported
        from zoo_torch.trainer import check_devices, main as train_main

        check_devices(args)                       # --gpu_ids must name existing GPUs
        args = resolve_data(args)                 # (the default dataset, generated once)
        if args.search:                           # --search_loss / --search_arch
            import importlib

            importlib.import_module(f"zoo_torch.search_{args.search['mode']}").main(args)
        else:
            train_main(args=args)


if __name__ == "__main__":
    main()
