#!/usr/bin/env python3
"""Train a CTR model with TensorFlow 2 (flags identical to train_example_pytorch.py).

    python train_example_tensorflow.py --model DeepFM                    # embedded synthetic data, CPU
    python train_example_tensorflow.py --model DeepFM --data data/criteo --epochs 100 --batch_size 4096 \\
        --optimizer Adam --loss BCE --gpu_ids '1, 2, 3, 4' --lr 0.001 --embed_size 8 \\
        --model_save_dir ./checkpoints/DeepFM/                           # MirroredStrategy over 4 GPUs
    python train_example_tensorflow.py --model DeepFM --cpu_replicas 2   # MirroredStrategy, 2 logical CPUs
    TF_CONFIG='{"cluster": {"worker": ["h1:12345", "h2:12345"]}, "task": {"type": "worker", "index": 0}}' \\
        python train_example_tensorflow.py --model DeepFM                # MultiWorkerMirroredStrategy

Prints tqdm progress on stderr and, as the LAST stdout line, one JSON object with
test_auc, test_logloss, epochs, train_rows_per_s, checkpoint (and bayes_auc /
auc_gap on synthetic data).  Bad flags: one line ``error: --flag: ...`` on
stderr, exit status 2.  ``--help`` lists every flag.
"""
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from common.runtime import configure_process  # noqa: E402

# OpenMP threads sleep when idle (see common/runtime.py; CTR_ZOO_PROCESS_TUNING=0 turns it off); the
# malloc part is for PyTorch only -- TensorFlow does not get faster with it, only bigger
configure_process(malloc=False)

from common.errors import cli_errors  # noqa: E402
from common.flags import parse_args, resolve_data  # noqa: E402


@contextlib.contextmanager
def quiet_stderr():
    """Silence the C++ log lines TensorFlow writes to fd 2 while it is imported."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    with cli_errors():
        args = parse_args(argv, "tensorflow")     # validated before TensorFlow is even imported
        with quiet_stderr():
            import tensorflow  # noqa: F401
        from zoo_tf.trainer import check_devices, main as train_main

        check_devices(args)                       # --gpu_ids must name existing GPUs
        args = resolve_data(args)                 # (the default dataset, generated once)
        if args.search:                           # --search_loss / --search_arch
            import importlib

            importlib.import_module(f"zoo_tf.search_{args.search['mode']}").main(args)
        else:
            train_main(args=args)


if __name__ == "__main__":
    main()
