"""``--search_arch`` with PyTorch: NASRec supernet warm-up + regularized evolution.

Mirror of zoo_tf/search_arch.py.

    python train_example_pytorch.py --search_arch --search_space small --n_blocks 7 --warmup_fraction 0.1 \\
        --zeroshot sigeo --model_save_dir ./checkpoints/nas
    python train_example_pytorch.py --model NASRec --supernet_config ./checkpoints/nas/rank1_<hash>.json

The driver (phases, data order, schedule, checkpoints, scoring, files, summary line) is
:mod:`common.nas_search`; this file is the PyTorch math it calls (:class:`TorchArchBackend`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import zoo_torch
from common import nas_search
from common.errors import cli_errors
from common.train_utils import split_prefix
from zoo_torch import proxies as tp
from zoo_torch import supernet as ts
from zoo_torch.optim import build_optimizer

__all__ = ["TorchArchBackend", "main"]


class TorchArchBackend(nas_search.ArchBackend):
    name = "pytorch"

    def __init__(self, settings: nas_search.ArchSearchSettings, schema, full_steps: int):
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.settings = settings
        self.device = torch.device("cuda", settings.gpu_ids[0]) if settings.gpu_ids else torch.device("cpu")
        torch.manual_seed(settings.seed)
        self.net = ts.build_supernet(schema, settings.space, full_steps=full_steps, path_seed=settings.seed,
                                     **settings.model_config).to(self.device)
        self.opt = build_optimizer(self.net, settings.optimizer_config())

    def to_batch(self, batch: dict):
        return {k: torch.from_numpy(np.array(v)).to(self.device) for k, v in batch.items()}

    def train_step(self, batch, lr: float) -> float:
        net = self.net
        net.train()
        self.opt.lr = float(lr)
        self.opt.zero_grad()
        logits = net(batch)                                   # the sampler draws this step's path
        loss = F.binary_cross_entropy_with_logits(logits, batch["label"].to(logits.dtype))
        pen = net.penalty(logits.shape[0])
        (loss + pen if torch.is_tensor(pen) else loss).backward()
        self.opt.step()
        return float(loss.detach())

    def sampler_state(self) -> dict:
        return self.net.sampler.state()

    def set_sampler_state(self, state: dict) -> None:
        self.net.sampler.set_state(state)

    def get_weights(self) -> dict:
        return zoo_torch.get_weights(self.net)

    def set_weights(self, weights: dict) -> None:
        zoo_torch.set_weights(self.net, weights)

    def state_arrays(self) -> dict:
        out = {f"w/{k}": v for k, v in self.get_weights().items()}
        out.update({f"opt/{k}": v for k, v in self.opt.state_arrays().items()})
        out["rng/torch"] = torch.get_rng_state().numpy().copy()
        return out

    def load_state_arrays(self, arrays: dict) -> None:
        self.set_weights(split_prefix(arrays, "w/"))
        self.opt.load_state_arrays(split_prefix(arrays, "opt/"))
        if "rng/torch" in arrays:
            torch.set_rng_state(torch.from_numpy(np.ascontiguousarray(arrays["rng/torch"])))

    def proxies(self, cfg, batches) -> dict:
        s = self.settings
        return tp.zero_shot_proxies(self.net.subnet(cfg), batches, s.zico_coef, s.fr_coef, s.loss_coef)

    def head_inputs(self, cfg, batch) -> np.ndarray:
        was = self.net.training
        self.net.eval()
        try:
            with torch.inference_mode():
                return ts.head_inputs(self.net, batch, cfg).float().cpu().numpy()
        finally:
            self.net.train(was)

    def active_head(self, cfg):
        return ts.active_head(self.net, cfg)


def main(args) -> dict:
    """Entry of ``train_example_pytorch.py --search_arch`` (``args``: TrainArgs, data resolved)."""
    with cli_errors():
        return nas_search.main(args, "pytorch", TorchArchBackend)
