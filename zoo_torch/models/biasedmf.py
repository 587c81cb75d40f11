"""BiasedMF -- matrix factorisation with biases (Koren et al. 2009), a recommender of AutoLossGen (SIGIR'22).

    y(u, i) = <e_u, e_i> + b_u + b_i + g          (logit; the probability is sigmoid(y))

The user u and the item i are the schema's FIRST TWO categorical fields, in
schema order (``uid``, ``iid`` for ml100k01-1-5); any other field is ignored.
``embedding.weight`` holds e_u and e_i (one offset table over the two fields),
``linear.emb.weight`` the biases b_u, b_i and ``linear.bias`` the global bias g
(:class:`LinearPart` over the two fields).
"""
from common.schema import Schema
from zoo_torch.layers.embeddings import FeatureEmbedding, LinearPart
from zoo_torch.models.base import CTRModel


def user_item_schema(schema) -> Schema:
    """The sub-schema of the first two categorical fields (user, item)."""
    cat = schema.categorical
    if len(cat) < 2:
        raise ValueError(f"{schema.name or 'this schema'} needs two categorical fields (user, item); "
                         f"it has {len(cat)}")
    return Schema(fields=list(cat[:2]), labels=list(schema.labels), name=schema.name, format=schema.format)


class BiasedMF(CTRModel):
    def __init__(self, schema, config):
        super().__init__(schema, config)
        ui = user_item_schema(schema)
        self.embedding = FeatureEmbedding(ui, config.embed_size, init_std=config.embedding_init_std)
        self.linear = LinearPart(ui)

    def forward(self, batch):
        e = self.embedding(batch)                       # [B, 2, d]
        return (e[:, 0] * e[:, 1]).sum(-1) + self.linear(batch)
