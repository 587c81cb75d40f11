"""NASRec supernet (weight sharing over a whole search space) for TensorFlow; mirror of zoo_torch/supernet.py.

    net = build_supernet(schema, SearchSpace.small(), full_steps=1000, path_seed=0, embed_size=16)
    logits = net(batch, training=True)               # samples a path per call unless net.set_path(...)
    logits = net(batch, path=subnet_cfg)             # a given subnet with the supernet's weights
    view = net.subnet(cfg)                           # SubnetView: view(batch, training=...), penalty
    model = standalone_from_supernet(net, cfg)       # a NASRec model with the inherited weights

The path is Python-level (each call may use a different subgraph): run it eagerly.
"""
from __future__ import annotations

from common.configs import make_config
from common.nas_space import (FULL, PathBlock, PathSampler, SearchSpace, SubnetConfig, SupernetLayout, as_path,
                              dense_stem_width, extract_subnet_weights, full_path, supernet_block_sizes)
from zoo_tf.layers.base import Module
from zoo_tf.layers.nasrec_ops import ElasticDense, NASRecBlock, forward_network
from zoo_tf.models.base import CTRModel

__all__ = ["SuperNet", "SubnetView", "build_supernet", "copy_supernet_weights", "standalone_from_supernet",
           "HEAD_WEIGHTS", "head_parameters", "snapshot_weights", "restore_weights", "head_inputs", "active_head"]

HEAD_WEIGHTS = ("head.kernel", "head.bias")


class SuperNet(CTRModel):
    def __init__(self, schema, config, space: SearchSpace, full_steps: int = 0, path_seed: int = 0):
        super().__init__(schema, config)
        self._space = space
        self._layout = SupernetLayout(space, dense_stem_width(schema), schema.num_fields, config.embed_size)
        self.embedding = self.make_embedding()
        self.blocks = [NASRecBlock(space.dense_ops, space.sparse_ops, True, True, supernet_block_sizes(self._layout, i), config.activation)
                       for i in range(space.num_blocks)]
        self.head = ElasticDense(self._layout.head_size, 1, use_bias=True)
        self._sampler = PathSampler(space, full_steps, path_seed)
        self._fixed_path = None
        self._last = (None, None)

    @property
    def space(self):
        return self._space

    @property
    def layout(self):
        return self._layout

    @property
    def sampler(self):
        return self._sampler

    @property
    def fixed_path(self):
        return self._fixed_path

    @property
    def last_path(self):
        return self._last[0]

    @property
    def last_config(self):
        return self._last[1]

    def resolve(self, path=None):
        cfg = None
        if path is None and self._fixed_path is not None:
            path = self._fixed_path
        if path is None:
            blocks, cfg = self._sampler.sample()
        elif isinstance(path, str):
            if path != FULL:
                raise ValueError(f"unknown path {path!r}")
            blocks = full_path(self._space)
        elif isinstance(path, SubnetConfig):
            if path.space != self._space:
                raise ValueError("the subnet config belongs to a different search space than the supernet")
            blocks, cfg = as_path(path), path
        elif isinstance(path, tuple) and path and isinstance(path[0], PathBlock):
            if len(path) != self._space.num_blocks:
                raise ValueError("path has the wrong number of blocks")
            blocks = path
        else:
            raise TypeError(f"cannot use {type(path).__name__} as a supernet path")
        self._last = (blocks, cfg)
        return blocks

    def set_path(self, path=None) -> None:
        self._fixed_path = path

    def __call__(self, batch, training=False, path=None):
        return forward_network(self, batch, self.resolve(path), self._layout)

    def subnet(self, cfg: SubnetConfig) -> "SubnetView":
        return SubnetView(self, cfg)


class SubnetView(Module):
    """A subnet evaluated with the supernet's (shared) weights (weights named ``supernet.*``)."""

    def __init__(self, supernet: SuperNet, cfg: SubnetConfig):
        super().__init__()
        if cfg.space != supernet.space:
            raise ValueError("the subnet config belongs to a different search space than the supernet")
        self.supernet = supernet
        self._cfg = cfg

    @property
    def subnet_config(self) -> SubnetConfig:
        return self._cfg

    def __call__(self, batch, training=False):
        return self.supernet(batch, training=training, path=self._cfg)

    def penalty(self, batch_size):
        return self.supernet.penalty(batch_size)


def build_supernet(schema, space: SearchSpace, full_steps: int = 0, path_seed: int = 0, **config) -> SuperNet:
    from zoo_tf import init_weights

    cfg = make_config("NASRec", **config)
    net = SuperNet(schema, cfg, space, full_steps=full_steps, path_seed=path_seed)
    net.model_name = "NASRecSuperNet"
    init_weights(net, cfg.seed)
    return net


def copy_supernet_weights(supernet: SuperNet, model) -> None:
    from zoo_tf import get_weights, set_weights

    set_weights(model, extract_subnet_weights(get_weights(supernet), model.subnet, supernet.layout))


def standalone_from_supernet(supernet: SuperNet, cfg: SubnetConfig, **config):
    from common.configs import config_to_dict
    from zoo_tf import build_model

    kw = config_to_dict(supernet.config)
    kw.update(config)
    kw["supernet_config"] = cfg.to_dict()
    model = build_model("NASRec", supernet.schema, **kw)
    copy_supernet_weights(supernet, model)
    return model


def head_parameters(net):
    """The final linear layer's variables (fine-tune only these to score a candidate)."""
    return [net.head.kernel, net.head.bias]


def snapshot_weights(net, names=HEAD_WEIGHTS) -> dict:
    from zoo_tf import named_weights

    own = named_weights(net)
    return {n: own[n].numpy().copy() for n in names}


def restore_weights(net, saved: dict) -> None:
    from zoo_tf import named_weights

    own = named_weights(net)
    for n, v in saved.items():
        own[n].assign(v)


class _HeadTap:
    """Mirror of zoo_torch.supernet._HeadTap (records the head's input in ``forward_network``)."""

    def __init__(self, net: SuperNet):
        self.embedding, self.blocks = net.embedding, net.blocks
        self.captured = None

    def head(self, feats, rows):
        self.captured = (feats, rows)
        return feats[:, :1]


def head_inputs(net: SuperNet, batch, cfg: SubnetConfig):
    """Mirror of zoo_torch.supernet.head_inputs: the subnet's active head features ``[B, F]``."""
    if cfg.space != net.space:
        raise ValueError("the subnet config belongs to a different search space than the supernet")
    tap = _HeadTap(net)
    forward_network(tap, batch, as_path(cfg), net.layout)
    return tap.captured[0]      # already the active features; the rows select the matching kernel rows


def active_head(net: SuperNet, cfg: SubnetConfig):
    """(kernel rows ``[F]`` as numpy, bias float) of the final linear layer that ``cfg`` uses."""
    return net.layout.active_head(cfg, net.head.kernel.numpy(), net.head.bias.numpy())
