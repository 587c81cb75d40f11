"""NASRec (Zhang et al., WWW 2023): a standalone subnet of the NASRec search space.

Mirror of zoo_torch/models/nasrec.py (equations there):
    block i: dense_{i+1} = DenseOp_i(...) (+ LN(FM(sparse) W)),  sparse_{i+1} = SparseOp_i(...) (++ LN(dense W))
    logit = [dense_N ; flatten(sparse_N)] w + b
"""
from common.nas_space import (as_path, default_subnet, dense_stem_width, load_subnet_config,
                              standalone_block_sizes, standalone_head_size)
from zoo_tf.layers.nasrec_ops import ElasticDense, NASRecBlock, forward_network
from zoo_tf.models.base import CTRModel


class NASRec(CTRModel):
    def __init__(self, schema, config):
        super().__init__(schema, config)
        spec = getattr(config, "supernet_config", "")
        self._subnet = load_subnet_config(spec) if spec else default_subnet()
        self._path = as_path(self._subnet)
        d, d0, f = config.embed_size, dense_stem_width(schema), schema.num_fields
        self.embedding = self.make_embedding()
        self.blocks = [NASRecBlock((b.dense_op,), (b.sparse_op,), b.dense_to_sparse, b.sparse_to_dense,
                                   standalone_block_sizes(self._subnet, i, d0, f, d), config.activation)
                       for i, b in enumerate(self._subnet.blocks)]
        self.head = ElasticDense(standalone_head_size(self._subnet, d), 1, use_bias=True)

    @property
    def subnet(self):
        return self._subnet

    @property
    def path(self):
        return self._path

    def __call__(self, batch, training=False):
        return forward_network(self, batch, self._path)
