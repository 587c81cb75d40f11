"""The PyTorch trainer: single device, nn.DataParallel over several --gpu_ids, or DDP under torchrun.

    python train_example_pytorch.py --model DeepFM                       # CPU (or one GPU: --gpu_ids 0)
    python train_example_pytorch.py --model DeepFM --gpu_ids 0,1,2,3     # nn.DataParallel
    torchrun --nproc_per_node 4 train_example_pytorch.py --model DeepFM  # DDP (gloo on CPU;
                                                                         # nccl with --gpu_ids 0,1,2,3)
    # several machines: the same command on each, with torchrun's standard rendezvous
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint HOST:29400 \\
             --rdzv_id job1 train_example_pytorch.py --model DeepFM --gpu_ids 0,1,2,3

DDP: every rank reads its own slice of each GLOBAL batch (``--batch_size`` is
global; ``zoo_torch.data.batches(..., rank, world_size)``), so with gradient
averaging the run equals single-process training with the same batch size.
The embedding tables have row-sparse gradients, which DDP's reducer cannot
handle for custom modules; they are excluded from DDP and all-gathered here
(:class:`SparseGradSync`: indices and rows of every rank, divided by the world
size), dense gradients go through DDP's bucketed all-reduce.

Checkpoints are written by rank 0; on resume rank 0 reads the checkpoint and
broadcasts weights, optimiser state and RNG state, so ``--model_save_dir`` does
not have to be on a shared filesystem.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import zoo_torch
from common.batching import num_batches, open_dataset
from common.errors import FlagError, cli_errors
from common.flags import check_gpu_ids
from common.metrics import auc, logloss
from common.optim import make_optimizer_config
from common.train_utils import Backend, TrainArgs, result_line, run_training, split_prefix
from zoo_torch.data import batches
from zoo_torch.losses import get_loss
from zoo_torch.optim import build_optimizer
from zoo_torch.step import TrainStep, predict as predict_batches


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 without it)."""
    ws = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if ws <= 1:
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), ws, int(os.environ.get("LOCAL_RANK", "0"))


def sparse_param_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if getattr(p, "zoo_sparse", False)]


def exclude_from_ddp(model: nn.Module, names: list[str]) -> None:
    """Make DDP ignore these parameters (the reducer keys root-level names with a leading dot)."""
    keys = list(names) + ["." + n for n in names if "." not in n]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, keys)


def allgather_sparse(grad: torch.Tensor, world_size: int) -> torch.Tensor:
    """Average a row-sparse gradient over all ranks: all-gather (indices, rows), values / world_size."""
    g = grad.coalesce()
    idx, val = g.indices()[0], g.values()
    dev = val.device
    n = torch.tensor([idx.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    m = max(sizes)
    pad_i = torch.zeros(m, dtype=torch.int64, device=dev)
    pad_v = torch.zeros((m,) + tuple(val.shape[1:]), dtype=val.dtype, device=dev)
    pad_i[:idx.numel()] = idx
    pad_v[:idx.numel()] = val
    all_i = [torch.empty_like(pad_i) for _ in range(world_size)]
    all_v = [torch.empty_like(pad_v) for _ in range(world_size)]
    dist.all_gather(all_i, pad_i)
    dist.all_gather(all_v, pad_v)
    idx = torch.cat([a[:k] for a, k in zip(all_i, sizes)])
    val = torch.cat([a[:k] for a, k in zip(all_v, sizes)]) / world_size
    return torch.sparse_coo_tensor(idx.unsqueeze(0), val, grad.shape, check_invariants=False)


class SparseGradSync:
    """Optimiser proxy: before each ``step()`` average the sparse gradients of ``params`` over all ranks."""

    def __init__(self, optimizer, params: list[nn.Parameter], world_size: int):
        self.optimizer, self.params, self.world_size = optimizer, params, world_size

    def zero_grad(self, *a, **kw):
        return self.optimizer.zero_grad(*a, **kw)

    def step(self):
        for p in self.params:
            if p.grad is None:   # every rank must join the collective: an untouched table sends nothing
                p.grad = torch.sparse_coo_tensor(torch.zeros((1, 0), dtype=torch.int64, device=p.device),
                                                 torch.zeros((0,) + tuple(p.shape[1:]), device=p.device), p.shape,
                                                 check_invariants=False)
            if p.grad.is_sparse:
                p.grad = allgather_sparse(p.grad, self.world_size)
                if p.grad._nnz() == 0:      # no rank touched the table: skip it, as one process would
                    p.grad = None
            else:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size
        self.optimizer.step()

    @property
    def lr(self):
        return self.optimizer.lr

    @lr.setter
    def lr(self, value):
        self.optimizer.lr = value

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, sd):
        return self.optimizer.load_state_dict(sd)


def check_devices(args: TrainArgs) -> None:
    """FlagError when --gpu_ids names a GPU this machine does not have."""
    check_gpu_ids(args.gpu_ids, torch.cuda.device_count())


class TorchBackend(Backend):
    name = "pytorch"

    def __init__(self, args: TrainArgs):
        self.args = args
        if args.threads:
            torch.set_num_threads(args.threads)
        self.rank, self.world_size, self.local_rank = dist_env()
        self.is_chief = self.rank == 0
        gpus = torch.cuda.device_count()
        check_gpu_ids(args.gpu_ids, gpus)
        if args.batch_size % self.world_size:
            raise FlagError("batch_size", f"global batch size {args.batch_size} is not divisible by the "
                                          f"{self.world_size} processes")
        # ---- devices ----
        self.dp_ids: list[int] = []
        if self.world_size > 1:
            if args.gpu_ids:
                if self.local_rank >= len(args.gpu_ids):
                    raise FlagError("gpu_ids", f"local rank {self.local_rank} has no GPU: --gpu_ids lists "
                                               f"{len(args.gpu_ids)} for {os.environ.get('LOCAL_WORLD_SIZE', '?')} "
                                               f"processes on this node")
                self.device = torch.device("cuda", args.gpu_ids[self.local_rank])
                torch.cuda.set_device(self.device)
                backend = "nccl"
            else:
                self.device = torch.device("cpu")
                backend = "gloo"
            if not dist.is_initialized():
                dist.init_process_group(backend)
        elif args.gpu_ids:
            self.device = torch.device("cuda", args.gpu_ids[0])
            torch.cuda.set_device(self.device)
            self.dp_ids = list(args.gpu_ids) if len(args.gpu_ids) > 1 else []
        else:
            self.device = torch.device("cpu")
        self.devices = str(self.device) + (f" (DataParallel over GPUs {self.dp_ids})" if self.dp_ids else "")
        if args.compile and (self.world_size > 1 or self.device.type != "cpu"):
            raise FlagError("compile", "torch.compile training is verified on one CPU process only; "
                                       "drop --compile for GPUs or torchrun")
        if self.dp_ids and args.model_config.get("l2_embedding"):
            raise FlagError("l2_embedding", "is not supported with nn.DataParallel (several --gpu_ids in one "
                                            "process); launch one process per GPU with torchrun instead")
        self.can_broadcast = self.world_size > 1

        # ---- data, model, optimiser ----
        self.schema, self.store = open_dataset(args.data)
        torch.manual_seed(args.seed)
        try:
            model = zoo_torch.build_model(args.model, self.schema, **args.model_config)
        except (TypeError, ValueError) as exc:
            raise FlagError("model", f"cannot build {args.model}: {exc}") from None
        try:
            loss_fn = get_loss(args.loss)
        except (ValueError, SyntaxError) as exc:
            raise FlagError("loss", str(exc)) from None
        self.model = model.to(self.device)
        forward = self.model
        self.sparse = sparse_param_names(self.model)
        if self.world_size > 1:
            exclude_from_ddp(self.model, self.sparse)
            forward = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        elif self.dp_ids:
            forward = nn.DataParallel(self.model, device_ids=self.dp_ids, output_device=self.dp_ids[0])
        self.forward = forward
        try:
            opt_cfg = make_optimizer_config(args.optimizer, args.lr, **args.optimizer_options)
        except ValueError as exc:
            raise FlagError("optimizer", str(exc)) from None
        self.optimizer = build_optimizer(self.model, opt_cfg)
        opt = self.optimizer
        if self.world_size > 1:
            named = dict(self.model.named_parameters())
            opt = SparseGradSync(self.optimizer, [named[n] for n in self.sparse], self.world_size)
        self.step = TrainStep(self.model, opt, loss_fn, forward=forward, compile=args.compile)
        if getattr(self.step.forward, "active", False):
            self.devices += " (torch.compile)"
        self.train_loader = batches(args.data, "train", args.batch_size, shuffle=True, seed=args.seed,
                                    rank=self.rank, world_size=self.world_size, device=self.device)
        self.eval_bs = args.eval_batch_size or args.batch_size
        self._eval_loaders: dict = {}

    # ----- Backend interface ---------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return num_batches(self.store.rows("train"), self.args.batch_size, False)

    def train_batches(self, epoch: int, start_batch: int):
        self.train_loader.set_epoch(epoch, start_batch)
        yield from self.train_loader          # delivered on self.device by the loader

    def train_step(self, item):
        return self.step(item)

    def item_rows(self, item) -> int:
        return int(item["label"].shape[0]) * self.world_size

    def to_floats(self, losses):
        if not losses:
            return []
        return torch.stack(losses).cpu().tolist()

    def _eval_loader(self, split: str):
        if split not in self._eval_loaders:   # opened once: opening verifies the store's checksums
            self._eval_loaders[split] = batches(self.args.data, split, self.eval_bs, shuffle=False,
                                                device=self.device)
        return self._eval_loaders[split]

    def predict(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return predict_batches(self.model, self._eval_loader(split))

    def evaluate(self, split: str, collective: bool = True) -> dict:
        res = None
        if self.is_chief or not collective:
            p, y = self.predict(split)
            res = {"auc": auc(y, p), "logloss": logloss(y, p), "rows": int(y.size)}
        if collective and self.world_size > 1:
            res = self.broadcast(res)
        return res

    def broadcast(self, obj):
        if self.world_size <= 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def set_lr(self, lr: float) -> None:
        self.optimizer.lr = float(lr)

    def get_weights(self):
        return zoo_torch.get_weights(self.model)

    def set_weights(self, weights):
        zoo_torch.set_weights(self.model, weights)

    def state_arrays(self) -> dict:
        out = {f"w/{k}": v for k, v in self.get_weights().items()}
        out.update({f"opt/{k}": v for k, v in self.optimizer.state_arrays().items()})
        out["rng/torch"] = torch.get_rng_state().numpy().copy()
        if self.device.type == "cuda":
            out["rng/cuda"] = torch.cuda.get_rng_state(self.device).numpy().copy()
        return out

    def load_state_arrays(self, arrays: dict) -> None:
        if arrays:
            self.set_weights(split_prefix(arrays, "w/"))
            self.optimizer.load_state_arrays(split_prefix(arrays, "opt/"))
            torch.set_rng_state(torch.from_numpy(np.ascontiguousarray(arrays["rng/torch"])))
            if "rng/cuda" in arrays and self.device.type == "cuda":
                torch.cuda.set_rng_state(torch.from_numpy(np.ascontiguousarray(arrays["rng/cuda"])), self.device)
        if self.world_size > 1:
            self._broadcast_state()

    def _broadcast_state(self) -> None:
        """Rank 0's weights, optimiser state and RNG state on every rank."""
        def bcast(t: torch.Tensor) -> torch.Tensor:
            x = t.to(self.device) if self.device.type == "cuda" else t
            dist.broadcast(x, src=0)
            return x.to(t.device) if x is not t else t

        with torch.no_grad():
            for t in zoo_torch.named_weights(self.model).values():
                t.copy_(bcast(t.detach().clone()))
            for slots in self.optimizer.state.values():
                for t in slots.values():
                    t.copy_(bcast(t.clone()))
        meta = self.broadcast({"t": self.optimizer.t, "lr": self.optimizer.lr,
                               "rng": torch.get_rng_state().numpy().tolist()})
        self.optimizer.t, self.optimizer.lr = meta["t"], meta["lr"]
        torch.set_rng_state(torch.tensor(meta["rng"], dtype=torch.uint8))

    def export(self, fmt: str, out_dir: str) -> str:
        from zoo_torch.export import export

        return export(self.model, fmt, out_dir)

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def model_meta(args: TrainArgs) -> dict:
    return {"model": args.model, "model_config": {k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in args.model_config.items()}}


def train(args: TrainArgs) -> dict | None:
    """Train according to ``args`` (data already resolved); the result dict on rank 0."""
    backend = TorchBackend(args)
    return run_training(args, backend, model_meta(args))


def main(argv: list[str] | None = None, args: TrainArgs | None = None) -> None:
    """Entry point of train_example_pytorch.py (flags already validated when ``args`` is given)."""
    with cli_errors():
        if args is None:
            from common.flags import parse_args, resolve_data

            args = resolve_data(parse_args(list(sys.argv if argv is None else argv), "pytorch"))
        result = train(args)
        if result is not None:
            print(result_line(result), flush=True)
