"""Model hyper-parameters (one dataclass per model, shared by both backends) and the model registry.

Adding a model = a config dataclass here (if it needs its own knobs), one
``register(...)`` line, and ``zoo_torch/models/<module>.py`` +
``zoo_tf/models/<module>.py`` each defining the class ``cls``.  The parity and
learning tests iterate over :data:`MODELS`, so a registered model is tested
without writing a new test.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    embed_size: int = 16
    l2: float = 0.0                 # L2 on dense kernels (not biases, not batch-norm parameters)
    l2_embedding: float = 0.0       # L2 on the embedding rows looked up in the batch (row-sparse friendly)
    embedding_init_std: float = 1e-4
    seed: int = 0                   # fixes initialisation (and the dropout stream)


@dataclass
class MLPConfig(ModelConfig):
    mlp: tuple[int, ...] = (400, 400, 400)
    activation: str = "relu"
    dropout: float = 0.0
    batch_norm: bool = False


@dataclass
class LRConfig(ModelConfig):
    pass


@dataclass
class FMConfig(ModelConfig):
    pass


@dataclass
class FFMConfig(ModelConfig):
    embed_size: int = 4


@dataclass
class DeepFMConfig(MLPConfig):
    pass


@dataclass
class DCNConfig(MLPConfig):
    cross_layers: int = 3


@dataclass
class DCNv2Config(MLPConfig):
    cross_layers: int = 3
    structure: str = "parallel"     # "parallel" | "stacked"
    low_rank: int = 0               # 0 = full-rank matrix cross; >0 = rank of the low-rank experts
    num_experts: int = 1            # mixture of low-rank experts (needs low_rank > 0)


@dataclass
class AFMConfig(ModelConfig):
    attention_size: int = 16
    attention_dropout: float = 0.0


@dataclass
class xDeepFMConfig(MLPConfig):
    cin_layers: tuple[int, ...] = (200, 200, 200)
    cin_split_half: bool = True


@dataclass
class AutoIntConfig(MLPConfig):
    mlp: tuple[int, ...] = ()       # AutoInt: no DNN; AutoInt+ adds one
    attention_layers: int = 3
    num_heads: int = 2
    attention_dim: int = 32         # size of each head's key/value space
    use_residual: bool = True
    use_wide: bool = False          # add a first-order (linear) term, as FuxiCTR's switch of that name


@dataclass
class AutoIntPlusConfig(AutoIntConfig):
    mlp: tuple[int, ...] = (400, 400, 400)


@dataclass
class NASRecConfig(ModelConfig):
    # a NASRec subnet: path to a subnet JSON file, a dict or a JSON string (common.nas_space.SubnetConfig);
    # "" = common.nas_space.default_subnet()
    supernet_config: Any = ""
    activation: str = "relu"        # of the FC / EFC ops and the attention feed-forward (NASRec: relu)


@dataclass
class BiasedMFConfig(ModelConfig):
    embed_size: int = 64            # AutoLossGen (SIGIR'22) recommender settings
    embedding_init_std: float = 0.1


@dataclass
class DeepModelConfig(MLPConfig):
    embed_size: int = 64
    embedding_init_std: float = 0.1
    mlp: tuple[int, ...] = (64, 16)
    batch_norm: bool = True
    dropout: float = 0.2


@dataclass(frozen=True)
class ModelEntry:
    name: str
    module: str          # file name under zoo_torch/models and zoo_tf/models
    cls: str             # class name in both files
    config: type


MODELS: dict[str, ModelEntry] = {}


def register(name: str, module: str, cls: str | None = None, config: type = ModelConfig) -> None:
    MODELS[name] = ModelEntry(name, module, cls or name, config)


register("LR", "lr", config=LRConfig)
register("FM", "fm", config=FMConfig)
register("FFM", "ffm", config=FFMConfig)
register("DeepFM", "deepfm", config=DeepFMConfig)
register("DCN", "dcn", config=DCNConfig)
register("DCNv2", "dcnv2", config=DCNv2Config)
register("AFM", "afm", config=AFMConfig)
register("xDeepFM", "xdeepfm", config=xDeepFMConfig)
register("AutoInt", "autoint", config=AutoIntConfig)
register("AutoIntPlus", "autoint", config=AutoIntPlusConfig)
register("NASRec", "nasrec", config=NASRecConfig)
register("BiasedMF", "biasedmf", config=BiasedMFConfig)
register("DeepModel", "deepmodel", config=DeepModelConfig)


def model_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        # case-insensitive convenience: "deepfm" -> "DeepFM"
        low = {k.lower(): k for k in MODELS}
        if name.lower() in low:
            return MODELS[low[name.lower()]]
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(MODELS)}")
    return MODELS[name]


def make_config(name: str, **overrides: Any):
    """The model's config dataclass with ``overrides`` applied (unknown keys are an error)."""
    entry = model_entry(name)
    known = {f.name: f for f in dataclasses.fields(entry.config)}
    bad = sorted(set(overrides) - set(known))
    if bad:
        raise ValueError(f"model {entry.name} has no option(s) {', '.join(bad)}; "
                         f"its options: {', '.join(known)}")
    kw = {}
    for k, v in overrides.items():
        if isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    return entry.config(**kw)


def config_to_dict(cfg) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
