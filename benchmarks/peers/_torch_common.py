"""Set-up shared by the PyTorch peers (deepctr-torch, fuxictr, torchfm)."""
from __future__ import annotations

import _bench


def setup_torch(spec: dict):
    """Import torch, fix its thread pools and seed; returns the module."""
    import torch

    torch.set_num_threads(int(spec["threads"]))
    try:
        torch.set_num_interop_threads(int(spec["inter_op_threads"]))
    except RuntimeError:   # already set in this process
        pass
    torch.manual_seed(int(spec["seed"]))
    return torch


def thread_info(torch) -> dict:
    return dict(intra_op_threads=torch.get_num_threads(), inter_op_threads=torch.get_num_interop_threads())


def base_result(spec: dict, library: str, version: str, torch) -> dict:
    return dict(runner=spec["runner"], model=spec["model"], library=library, library_version=version,
                framework="torch", framework_version=torch.__version__, device="cpu", optimizer="Adam",
                lr=spec["lr"], batch_size=spec["batch_size"], threads=thread_info(torch),
                rss_after_import_mb=_bench.current_rss_mb())


def num_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))
