"""NASRec supernet (weight sharing over a whole search space) for PyTorch; mirror of zoo_tf/supernet.py.

    net = build_supernet(schema, SearchSpace.small(), full_steps=1000, path_seed=0, embed_size=16)
    logits = net(batch)                    # samples a path per call (PathSampler), unless net.set_path(...)
    logits = net(batch, path=subnet_cfg)   # a given subnet with the supernet's weights
    view = net.subnet(cfg)                 # SubnetView: a model-like object (view(batch), penalty)
    model = standalone_from_supernet(net, cfg)   # a NASRec model with the inherited weights

Every op of every block is held at the space's maximum widths; a path uses the first
``width`` channels of its ops and the rows of its input sources (common.nas_space.SupernetLayout).
Weights: ``embedding.*``, ``blocks.<i>.<op>.*``, ``head.*`` -- the NASRec model's names.
"""
from __future__ import annotations

from torch import nn

from common.configs import make_config
from common.nas_space import (FULL, PathBlock, PathSampler, SearchSpace, SubnetConfig, SupernetLayout, as_path,
                              dense_stem_width, extract_subnet_weights, full_path, supernet_block_sizes)
from zoo_torch.layers.nasrec_ops import ElasticDense, NASRecBlock, forward_network
from zoo_torch.models.base import CTRModel

__all__ = ["SuperNet", "SubnetView", "build_supernet", "copy_supernet_weights", "standalone_from_supernet",
           "HEAD_WEIGHTS", "head_parameters", "snapshot_weights", "restore_weights", "head_inputs", "active_head"]

HEAD_WEIGHTS = ("head.kernel", "head.bias")   # the final linear layer (fine-tuned per candidate)


class SuperNet(CTRModel):
    def __init__(self, schema, config, space: SearchSpace, full_steps: int = 0, path_seed: int = 0):
        super().__init__(schema, config)
        self.space = space
        self.layout = SupernetLayout(space, dense_stem_width(schema), schema.num_fields, config.embed_size)
        self.embedding = self.make_embedding()
        self.blocks = nn.ModuleList(
            NASRecBlock(space.dense_ops, space.sparse_ops, True, True, supernet_block_sizes(self.layout, i), config.activation)
            for i in range(space.num_blocks))
        self.head = ElasticDense(self.layout.head_size, 1, use_bias=True)
        self.sampler = PathSampler(space, full_steps, path_seed)
        self.fixed_path = None     # set_path(): used by calls without an explicit path
        self.last_path = None      # path blocks of the last call
        self.last_config = None    # its SubnetConfig (None for the full supernet)

    def resolve(self, path=None):
        """Path blocks for ``path``: None (fixed path, else a sampled one), "full", a SubnetConfig,
        or path blocks.  Records last_path / last_config."""
        cfg = None
        if path is None and self.fixed_path is not None:
            path = self.fixed_path
        if path is None:
            blocks, cfg = self.sampler.sample()
        elif isinstance(path, str):
            if path != FULL:
                raise ValueError(f"unknown path {path!r}")
            blocks = full_path(self.space)
        elif isinstance(path, SubnetConfig):
            if path.space != self.space:
                raise ValueError("the subnet config belongs to a different search space than the supernet")
            blocks, cfg = as_path(path), path
        elif isinstance(path, tuple) and path and isinstance(path[0], PathBlock):
            if len(path) != self.space.num_blocks:
                raise ValueError("path has the wrong number of blocks")
            blocks = path
        else:
            raise TypeError(f"cannot use {type(path).__name__} as a supernet path")
        self.last_path, self.last_config = blocks, cfg
        return blocks

    def set_path(self, path=None) -> None:
        """Fix the path used by calls without ``path`` (None = sample per call again)."""
        self.fixed_path = path

    def forward(self, batch, path=None):
        return forward_network(self, batch, self.resolve(path), self.layout)

    def subnet(self, cfg: SubnetConfig) -> "SubnetView":
        return SubnetView(self, cfg)


class SubnetView(nn.Module):
    """A subnet evaluated with the supernet's (shared) weights: ``view(batch)``, ``view.penalty(b)``."""

    def __init__(self, supernet: SuperNet, cfg: SubnetConfig):
        super().__init__()
        if cfg.space != supernet.space:
            raise ValueError("the subnet config belongs to a different search space than the supernet")
        self.supernet = supernet
        self.config_ = cfg

    @property
    def subnet_config(self) -> SubnetConfig:
        return self.config_

    def forward(self, batch):
        return self.supernet(batch, path=self.config_)

    def penalty(self, batch_size: int):
        return self.supernet.penalty(batch_size)


def build_supernet(schema, space: SearchSpace, full_steps: int = 0, path_seed: int = 0, **config) -> SuperNet:
    """A supernet over ``space``; ``config`` = NASRec model options (embed_size, seed, l2, ...)."""
    from zoo_torch import init_weights

    cfg = make_config("NASRec", **config)
    net = SuperNet(schema, cfg, space, full_steps=full_steps, path_seed=path_seed)
    net.model_name = "NASRecSuperNet"
    init_weights(net, cfg.seed)
    return net


def copy_supernet_weights(supernet: SuperNet, model) -> None:
    """Set a standalone NASRec model's weights to its subnet's slices of the supernet weights."""
    from zoo_torch import get_weights, set_weights

    set_weights(model, extract_subnet_weights(get_weights(supernet), model.subnet, supernet.layout))


def standalone_from_supernet(supernet: SuperNet, cfg: SubnetConfig, **config):
    """A NASRec model of ``cfg`` (same embedding size/options as the supernet) with inherited weights."""
    from common.configs import config_to_dict
    from zoo_torch import build_model

    kw = config_to_dict(supernet.config)
    kw.update(config)
    kw["supernet_config"] = cfg.to_dict()
    model = build_model("NASRec", supernet.schema, **kw)
    copy_supernet_weights(supernet, model)
    return model


def head_parameters(net):
    """The final linear layer's parameters (fine-tune only these to score a candidate)."""
    return [net.head.kernel, net.head.bias]


def snapshot_weights(net, names=HEAD_WEIGHTS) -> dict:
    """Copies of some weights (e.g. the shared head before fine-tuning it for one candidate)."""
    from zoo_torch import named_weights

    own = named_weights(net)
    return {n: own[n].detach().clone() for n in names}


def restore_weights(net, saved: dict) -> None:
    import torch

    from zoo_torch import named_weights

    own = named_weights(net)
    with torch.no_grad():
        for n, v in saved.items():
            own[n].copy_(v)


class _HeadTap:
    """Stands in for the supernet in ``forward_network``: same embedding and blocks, but its head
    records the head's input (features, active rows) instead of computing the logit."""

    def __init__(self, net: SuperNet):
        self.embedding, self.blocks = net.embedding, net.blocks
        self.captured = None

    def head(self, feats, rows):
        self.captured = (feats, rows)
        return feats[:, :1]


def head_inputs(net: SuperNet, batch, cfg: SubnetConfig):
    """The subnet's input to the final linear layer, its active features only ``[B, F]``:
    ``net(batch, path=cfg) == head_inputs(...) @ active_head(net, cfg)[0] + active_head(...)[1]``."""
    if cfg.space != net.space:
        raise ValueError("the subnet config belongs to a different search space than the supernet")
    tap = _HeadTap(net)
    forward_network(tap, batch, as_path(cfg), net.layout)
    return tap.captured[0]      # already the active features; the rows select the matching kernel rows


def active_head(net: SuperNet, cfg: SubnetConfig):
    """(kernel rows ``[F]`` as numpy, bias float) of the final linear layer that ``cfg`` uses."""
    return net.layout.active_head(cfg, net.head.kernel.detach().cpu().numpy(), net.head.bias.detach().cpu().numpy())
