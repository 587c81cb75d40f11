"""Backend-free core of the CTR zoo: schema, encoders, LMDB store, metrics, configs, search drivers.

Nothing in this package imports torch or tensorflow.
"""
