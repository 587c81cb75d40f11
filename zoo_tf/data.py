"""TensorFlow loader over the shared LMDB store: same rows, same order as zoo_torch.data.batches."""
from __future__ import annotations

import tensorflow as tf

from common.batching import iter_packed, open_dataset, unpack


def element_spec(schema, with_prob: bool = False) -> dict:
    spec = {}
    for f in schema.categorical:
        spec[f.name] = tf.TensorSpec([None], tf.int32)
    for f in schema.numeric:
        spec[f.name] = tf.TensorSpec([None], tf.float32)
    for f in schema.sequence:
        spec[f.name] = tf.TensorSpec([None, f.max_len], tf.int32)
    spec["label"] = tf.TensorSpec([None], tf.float32)
    if with_prob:
        spec["prob"] = tf.TensorSpec([None], tf.float32)
    return spec


def batches(dataset_dir, split="train", batch_size=4096, shuffle=True, seed=0, rank=0, world_size=1,
            drop_last=False, epoch=0, start_batch=0, prefetch=4) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of ``{field: tensor, "label": tensor}`` dicts, with prefetch.

    Each iteration of the dataset is one pass in the order of ``epoch``.
    """
    schema, store = open_dataset(dataset_dir)
    with_prob = any(s.name == "prob" for s in store.layout)

    def gen():
        for packed in iter_packed(store, split, batch_size, shuffle, seed, epoch, rank, world_size, drop_last,
                                  start_batch):
            yield unpack(schema, packed)

    ds = tf.data.Dataset.from_generator(gen, output_signature=element_spec(schema, with_prob))
    return ds.prefetch(prefetch) if prefetch else ds
