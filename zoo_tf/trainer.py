"""The TensorFlow trainer: one device, MirroredStrategy, or MultiWorkerMirroredStrategy (TF_CONFIG).

    python train_example_tensorflow.py --model DeepFM                      # CPU
    python train_example_tensorflow.py --model DeepFM --gpu_ids 0,1,2,3    # MirroredStrategy over 4 GPUs
    python train_example_tensorflow.py --model DeepFM --cpu_replicas 2     # MirroredStrategy over 2 logical CPUs
    # several machines (or processes): one process per worker, each with its TF_CONFIG, e.g.
    TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}' \\
        python train_example_tensorflow.py --model DeepFM --model_save_dir /shared/ckpt/DeepFM

The training loop is a custom ``strategy.run`` loop (not ``model.fit``).  Each
replica gets its own slice of the GLOBAL batch from the shared data layer
(``common.batching.iter_packed(..., rank=global replica id, world_size=replicas)``);
every replica computes the gradient of its slice's mean loss, the gradients
(dense tensors and the embeddings' ``tf.IndexedSlices``) are summed over all
replicas with ``ReplicaContext.all_reduce`` and divided by the number of
replicas, and every replica applies the same update to its own copy of the
variables -- the same result as one device with the whole batch.

Batch-norm moving statistics are created with MEAN aggregation, so under a
strategy each replica's update is averaged (statistics of the local slice, as
in DDP without SyncBatchNorm).  Multi-worker checkpoints are written by the
chief and read by every worker: ``--model_save_dir`` must be on a filesystem
all workers share.
"""
from __future__ import annotations

import json
import os
import sys

import tensorflow as tf

import zoo_tf
from common.batching import categorical_offsets, iter_packed, num_batches, open_dataset, unpack
from common.errors import FlagError, cli_errors
from common.flags import check_gpu_ids
from common.metrics import auc, logloss
from common.optim import make_optimizer_config
from common.train_utils import Backend, TrainArgs, prefetch, result_line, run_training, split_prefix
from zoo_tf.data import element_spec, numpy_plan
from zoo_tf.layers.base import Dropout
from zoo_tf.losses import get_loss
from zoo_tf.optim import build_optimizer
from zoo_tf.step import TrainStep, predict


def cluster_info() -> dict | None:
    """``{"num_workers", "worker_index", "is_chief"}`` from TF_CONFIG, or None for one worker."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
        cluster, task = cfg.get("cluster", {}), cfg.get("task", {})
        chiefs, workers = list(cluster.get("chief", [])), list(cluster.get("worker", []))
        kind, index = task.get("type", "worker"), int(task.get("index", 0))
    except (ValueError, AttributeError, TypeError) as exc:
        raise FlagError("TF_CONFIG", f"not a valid TF_CONFIG: {exc}") from None
    n = len(chiefs) + len(workers)
    if n <= 1:
        return None
    if kind == "chief":
        wi = 0
    elif kind == "worker":
        wi = index + len(chiefs)
    else:
        raise FlagError("TF_CONFIG", f"task type {kind!r} is not supported (chief or worker)")
    return {"num_workers": n, "worker_index": wi, "is_chief": wi == 0}


def _mean_aggregation_for_state(next_creator, **kw):
    """Variable creator: non-trainable float variables (batch-norm moving stats) aggregate by MEAN."""
    if not kw.get("trainable", True):
        dt = kw.get("dtype")
        if dt is None:
            dt = getattr(kw.get("initial_value"), "dtype", None)
        if dt is not None and tf.as_dtype(dt).is_floating:
            kw["aggregation"] = tf.VariableAggregation.MEAN
    return next_creator(**kw)


def check_devices(args: TrainArgs) -> None:
    """FlagError when --gpu_ids names a GPU this machine does not have."""
    check_gpu_ids(args.gpu_ids, len(tf.config.list_physical_devices("GPU")))


def configure(args: TrainArgs):
    """Set up devices and the distribution strategy (before TF's runtime starts).

    Returns ``(strategy or None, cluster info or None)``.
    """
    if args.threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        except RuntimeError:
            pass
    cluster = cluster_info()
    gpus = tf.config.list_physical_devices("GPU")
    check_gpu_ids(args.gpu_ids, len(gpus))
    if args.cpu_replicas > 1 and cluster:
        raise FlagError("cpu_replicas", "cannot be combined with a multi-worker TF_CONFIG")
    try:
        tf.config.set_visible_devices([gpus[i] for i in args.gpu_ids], "GPU")
        if args.cpu_replicas > 1:
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(args.cpu_replicas)])
    except RuntimeError as exc:   # runtime already initialised (in-process use): keep what exists
        if args.cpu_replicas > 1 and len(tf.config.list_logical_devices("CPU")) < args.cpu_replicas:
            raise FlagError("cpu_replicas", f"TensorFlow is already initialised: {exc}") from None
    if cluster:
        return tf.distribute.MultiWorkerMirroredStrategy(), cluster
    if len(args.gpu_ids) > 1:
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(len(args.gpu_ids))]), None
    if len(args.gpu_ids) == 1:
        return tf.distribute.OneDeviceStrategy("/gpu:0"), None
    if args.cpu_replicas > 1:
        return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(args.cpu_replicas)]), None
    return None, None


class TFBackend(Backend):
    name = "tensorflow"

    def __init__(self, args: TrainArgs):
        self.args = args
        self.strategy, cluster = configure(args)
        s = self.strategy
        self.num_workers = cluster["num_workers"] if cluster else 1
        self.worker_index = cluster["worker_index"] if cluster else 0
        self.is_chief = cluster["is_chief"] if cluster else True
        self.world_size = s.num_replicas_in_sync if s is not None else 1
        if s is not None:
            self.devices = f"{type(s).__name__} over {', '.join(s.extended.worker_devices)}"
        self.local_replicas = self.world_size // self.num_workers
        if args.batch_size % self.world_size:
            raise FlagError("batch_size", f"global batch size {args.batch_size} is not divisible by the "
                                          f"{self.world_size} replicas")
        self.schema, self.store = open_dataset(args.data)
        self.keys = tuple(element_spec(self.schema))
        tf.random.set_seed(args.seed)
        try:
            if s is not None:
                with s.scope(), tf.variable_creator_scope(_mean_aggregation_for_state):
                    self.model = zoo_tf.build_model(args.model, self.schema, **args.model_config)
            else:
                self.model = zoo_tf.build_model(args.model, self.schema, **args.model_config)
        except (TypeError, ValueError) as exc:
            raise FlagError("model", f"cannot build {args.model}: {exc}") from None
        try:
            loss_fn = get_loss(args.loss)
        except (ValueError, SyntaxError) as exc:
            raise FlagError("loss", str(exc)) from None
        try:
            cfg = make_optimizer_config(args.optimizer, args.lr, **args.optimizer_options)
        except ValueError as exc:
            raise FlagError("optimizer", str(exc)) from None
        if s is not None:
            with s.scope():
                self.optimizer = build_optimizer(self.model, cfg)
        else:
            self.optimizer = build_optimizer(self.model, cfg)
        self.step = TrainStep(self.model, self.optimizer, loss_fn)
        self.eval_bs = args.eval_batch_size or args.batch_size
        if s is not None:
            self._dist_step = tf.function(self._dist_step_impl, reduce_retracing=True)

    # ----- distributed step ------------------------------------------------------------------
    def _replica_step(self, batch):
        loss, grads = self.step.gradients(batch)
        ctx = tf.distribute.get_replica_context()
        n = ctx.num_replicas_in_sync
        names = [k for k, g in grads.items() if g is not None]
        reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [grads[k] for k in names])
        scaled = {}
        for k, g in zip(names, reduced):
            if isinstance(g, tf.IndexedSlices):
                scaled[k] = tf.IndexedSlices(g.values / n, g.indices, g.dense_shape)
            else:
                scaled[k] = g / n
        self.optimizer.apply(scaled)
        return loss

    def _dist_step_impl(self, dist_batch):
        per_replica = self.strategy.run(self._replica_step, args=(dist_batch,))
        return self.strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

    # ----- Backend interface ---------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return num_batches(self.store.rows("train"), self.args.batch_size, False)

    def _numpy_batches(self, split, batch_size, shuffle, epoch=0, start_batch=0, rank=0, world_size=1,
                       plan=False):
        """Field dicts of numpy arrays; ``plan=True`` adds the row plan (zoo_tf.data.numpy_plan), computed
        here, i.e. in the prefetch thread, so the step has no sort to do."""
        offsets = categorical_offsets(self.schema) if plan and self.schema.categorical else None
        for packed in iter_packed(self.store, split, batch_size, shuffle, self.args.seed, epoch, rank, world_size,
                                  False, start_batch):
            b = unpack(self.schema, packed)
            out = {k: b[k] for k in self.keys}
            if offsets is not None:
                out.update(numpy_plan(packed["cat"], offsets))
            yield out

    def _replica_parts(self, epoch, start_batch):
        """Per step: the numpy batches of this worker's replicas (global ids worker*R .. worker*R+R-1)."""
        first = self.worker_index * self.local_replicas
        its = [self._numpy_batches("train", self.args.batch_size, True, epoch, start_batch, first + j,
                                   self.world_size) for j in range(self.local_replicas)]
        while True:
            parts = []
            for it in its:
                try:
                    parts.append(next(it))
                except StopIteration:
                    return
            yield parts

    def train_batches(self, epoch: int, start_batch: int):
        if self.strategy is None:
            yield from prefetch(self._numpy_batches("train", self.args.batch_size, True, epoch, start_batch,
                                                    plan=True))
            return
        first = self.worker_index * self.local_replicas
        for parts in prefetch(self._replica_parts(epoch, start_batch)):
            def value_fn(ctx, parts=parts):
                return {k: tf.convert_to_tensor(v) for k, v in parts[ctx.replica_id_in_sync_group - first].items()}

            dist = self.strategy.experimental_distribute_values_from_function(value_fn)
            yield dist, sum(len(p["label"]) for p in parts) * self.num_workers

    def train_step(self, item):
        if self.strategy is None:
            return self.step(item)
        return self._dist_step(item[0])

    def item_rows(self, item) -> int:
        if self.strategy is None:
            return int(len(item["label"]))
        return int(item[1])

    def to_floats(self, losses):
        return [float(x) for x in losses]

    def evaluate(self, split: str, collective: bool = True) -> dict:
        """Every worker evaluates the whole split itself (identical weights -> identical answers)."""
        p, y = predict(self.model, prefetch(self._numpy_batches(split, self.eval_bs, False)))
        return {"auc": auc(y, p), "logloss": logloss(y, p), "rows": int(y.size)}

    def set_lr(self, lr: float) -> None:
        self.optimizer.set_lr(float(lr))

    def get_weights(self):
        return zoo_tf.get_weights(self.model)

    def set_weights(self, weights):
        zoo_tf.set_weights(self.model, weights)

    def _dropouts(self):
        return [(n, m) for n, m in self.model.zoo_modules() if isinstance(m, Dropout) and m._rng is not None]

    def state_arrays(self) -> dict:
        out = {f"w/{k}": v for k, v in self.get_weights().items()}
        out.update({f"opt/{k}": v for k, v in self.optimizer.state_arrays().items()})
        for n, m in self._dropouts():
            out[f"rng/tf_dropout/{n}"] = m._rng.state.numpy().copy()
        return out

    def load_state_arrays(self, arrays: dict) -> None:
        if not arrays:
            raise FlagError("model_save_dir", "the checkpoint is not readable on this worker: with several "
                                              "workers --model_save_dir must be on a shared filesystem")
        self.set_weights(split_prefix(arrays, "w/"))
        self.optimizer.load_state_arrays(split_prefix(arrays, "opt/"))
        rng = split_prefix(arrays, "rng/tf_dropout/")
        for n, m in self._dropouts():
            if n in rng:
                m._rng.state.assign(rng[n])

    def export(self, fmt: str, out_dir: str) -> str:
        from zoo_tf.export import SAVED_MODEL_DIR, export_weights

        if fmt != "saved_model":
            raise ValueError(f"unknown export format {fmt!r} (TensorFlow: saved_model)")
        return export_weights(self.args.model, self.schema, self.args.model_config, self.get_weights(),
                              os.path.join(out_dir, SAVED_MODEL_DIR))


def model_meta(args: TrainArgs) -> dict:
    return {"model": args.model, "model_config": {k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in args.model_config.items()}}


def train(args: TrainArgs) -> dict | None:
    """Train according to ``args`` (data already resolved); the result dict on the chief."""
    backend = TFBackend(args)
    return run_training(args, backend, model_meta(args))


def main(argv: list[str] | None = None, args: TrainArgs | None = None) -> None:
    """Entry point of train_example_tensorflow.py (flags already validated when ``args`` is given)."""
    with cli_errors():
        if args is None:
            from common.flags import parse_args, resolve_data

            args = resolve_data(parse_args(list(sys.argv if argv is None else argv), "tensorflow"))
        result = train(args)
        if result is not None:
            print(result_line(result), flush=True)
