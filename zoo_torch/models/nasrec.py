"""NASRec (Zhang et al., WWW 2023): a standalone subnet of the NASRec search space.

    dense_0 = numeric features, sparse_0 = field embeddings E [B, F, d]
    block i: dense_{i+1}  = DenseOp_i(inputs from dense_in / sparse_in / left, right)
                            (+ LN(FM(sparse op output) W)            if sparse_to_dense)
             sparse_{i+1} = SparseOp_i(concat of sparse_in sources)
                            (++ LN(dense op output W) as 8 features  if dense_to_sparse)
    logit = [dense_N ; flatten(sparse_N)] w + b

The architecture comes from ``config.supernet_config`` (a subnet JSON file path, dict or
JSON string, see common.nas_space.SubnetConfig); empty = common.nas_space.default_subnet().
Weights of a trained supernet are copied in with zoo_torch.supernet.copy_supernet_weights.
"""
from torch import nn

from common.nas_space import (as_path, default_subnet, dense_stem_width, load_subnet_config,
                              standalone_block_sizes, standalone_head_size)
from zoo_torch.layers.nasrec_ops import ElasticDense, NASRecBlock, forward_network
from zoo_torch.models.base import CTRModel


class NASRec(CTRModel):
    def __init__(self, schema, config):
        super().__init__(schema, config)
        spec = getattr(config, "supernet_config", "")
        self.subnet = load_subnet_config(spec) if spec else default_subnet()
        self.path = as_path(self.subnet)
        d, d0, f = config.embed_size, dense_stem_width(schema), schema.num_fields
        self.embedding = self.make_embedding()
        self.blocks = nn.ModuleList(
            NASRecBlock((b.dense_op,), (b.sparse_op,), b.dense_to_sparse, b.sparse_to_dense,
                        standalone_block_sizes(self.subnet, i, d0, f, d), config.activation)
            for i, b in enumerate(self.subnet.blocks))
        self.head = ElasticDense(standalone_head_size(self.subnet, d), 1, use_bias=True)

    def forward(self, batch):
        return forward_network(self, batch, self.path)
