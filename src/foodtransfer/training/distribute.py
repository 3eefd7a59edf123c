"""Where training runs and in which precision: TensorFlow's own ``tf.distribute`` strategies
chosen by the ``strategy`` param, Keras' global dtype policy chosen by ``mixed_precision``,
and the GPUs' settings (memory growth) and names.

- ``auto``: TensorFlow's default strategy (one device), or ``MirroredStrategy`` over every GPU
  when more than one is visible.
- ``mirrored``: ``MirroredStrategy``: one replica per visible GPU, or per logical CPU device
  when there is no GPU.
- ``multi_worker``: ``MultiWorkerMirroredStrategy``, configured by the ``TF_CONFIG``
  environment variable on every worker. Refused for now when TF_CONFIG names more than one
  worker: Keras 3's ``model.fit`` fails there (see :func:`_check_multi_worker_fit`).

The training stages build and compile every model they train inside ``strategy.scope()``, so
its variables are mirrored on every replica. ``batch_size`` is the global batch: Keras splits
each batch across the ``num_replicas_in_sync`` replicas.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args

from foodtransfer.config import Params, StrategyName
from foodtransfer.errors import ConfigError

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = get_args(StrategyName)
MIXED_POLICY = "mixed_float16"
FLOAT_POLICY = "float32"
CPU_PRECISION_WARNING = ("warning: mixed_precision = true is ignored on CPU (no GPU visible): "
                         "training in float32")
TF_CONFIG_EXAMPLE = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}\'')


def _tf_config_error(problem: str) -> ConfigError:
    return ConfigError(
        f"params: strategy = 'multi_worker' {problem}. Set TF_CONFIG on every worker, e.g. "
        f"{TF_CONFIG_EXAMPLE} (index 1 on the second machine), or use strategy=auto or "
        "strategy=mirrored on one machine."
    )


def _tf_config() -> dict[str, Any]:
    """TF_CONFIG, parsed and checked enough for a clear error instead of one from deep inside
    TensorFlow's cluster resolver."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        raise _tf_config_error("needs the TF_CONFIG environment variable (the cluster's "
                               "addresses and this worker's task), and TF_CONFIG is not set")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise _tf_config_error(f"needs TF_CONFIG in JSON, and TF_CONFIG = {raw!r} is not "
                               f"valid JSON ({error})") from error
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not cluster or not isinstance(task, dict) \
            or "type" not in task or "index" not in task:
        raise _tf_config_error(f"needs a 'cluster' mapping (task type -> list of host:port) "
                               f"and a 'task' with 'type' and 'index' in TF_CONFIG, and "
                               f"TF_CONFIG = {raw!r} lacks them")
    members = cluster.get(task["type"])
    if not isinstance(members, list) or not isinstance(task["index"], int) \
            or not 0 <= task["index"] < len(members):
        raise _tf_config_error(f"needs this worker's task in the cluster, and TF_CONFIG = "
                               f"{raw!r} names a task ({task['type']!r}, index "
                               f"{task['index']!r}) that its {task['type']!r} list lacks")
    return config


def _check_multi_worker_fit(tf_config: dict[str, Any]) -> None:
    """Refuse a cluster of more than one worker: Keras 3's ``model.fit`` fails in its first
    step under ``MultiWorkerMirroredStrategy`` across workers (it reduces the whole
    ``(x, y)`` batch as one value: "Attempt to convert a value (PerReplica...) to a Tensor"),
    seen with Keras 3.15.1 / TensorFlow 2.21 on two local workers, plain Keras model and
    dataset included; upstream issue keras-team/keras#20585. Remove this check once a Keras
    release trains there (one worker per cluster works and stays allowed)."""
    cluster = tf_config["cluster"]
    workers = sum(len(cluster.get(kind) or []) for kind in ("chief", "worker"))
    if workers > 1:
        import keras

        raise ConfigError(
            f"params: strategy = 'multi_worker' with {workers} workers in TF_CONFIG: "
            f"Keras {keras.__version__}'s model.fit cannot train under "
            "MultiWorkerMirroredStrategy across several workers (it fails in its first step; "
            "keras-team/keras#20585). Use strategy=mirrored on one machine with several "
            "GPUs, or run separate experiments on each machine (README: 'Multiple GPUs or "
            "machines')."
        )


def make_strategy(name: str, devices: Sequence[str] | None = None) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy for the ``strategy`` param ``name``.

    ``devices`` (``mirrored`` only) names the devices to mirror over, e.g.
    ``["/cpu:0", "/cpu:1"]``; by default every visible GPU, or every logical CPU device when no
    GPU is visible. Call it before any other TensorFlow work of the process:
    ``MultiWorkerMirroredStrategy`` must set up its collectives first. The same arguments give
    the same strategy object again.
    """
    if name not in STRATEGIES:
        raise ConfigError(f"params: strategy = {name!r} is not allowed: choose one of "
                          + ", ".join(repr(s) for s in STRATEGIES))
    if devices is not None and name != "mirrored":
        raise ValueError(f"devices are for strategy 'mirrored' only, not {name!r}")
    if name == "multi_worker":
        _check_multi_worker_fit(_tf_config())
        return _created("multi_worker", None)

    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if name == "auto":
        return _created("mirrored", None) if len(gpus) > 1 else tf.distribute.get_strategy()
    if devices is None and not gpus:
        # MirroredStrategy() alone would take only /cpu:0; mirror over every logical CPU.
        devices = [device.name for device in tf.config.list_logical_devices("CPU")]
    return _created("mirrored", tuple(devices) if devices is not None else None)


@functools.cache
def _created(kind: str, devices: tuple[str, ...] | None) -> tf.distribute.Strategy:
    """One strategy object per kind and devices for the whole process: TensorFlow numbers
    collective operations per strategy object, so a second strategy over the same devices
    reuses the first one's numbers and their all-reduces collide ("Shape mismatch in the
    collective instance") when both train in one process."""
    import tensorflow as tf

    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.MirroredStrategy(list(devices) if devices is not None else None)


def visible_gpus() -> list[dict[str, Any]]:
    """Name and compute capability of each GPU TensorFlow sees."""
    import tensorflow as tf

    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        gpus.append({"name": details.get("device_name", gpu.name),
                     "compute_capability": details.get("compute_capability")})
    return gpus


def configure_gpus() -> None:
    """GPU memory growth on: TensorFlow takes GPU memory as it needs it, instead of all of it
    at start (other processes, a second stage, the MLflow UI can share the GPU). Call before
    anything runs on a GPU."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised in this process: its setting stays
            pass


def device_name(gpus: list[dict[str, Any]]) -> str:
    """What trains: ``NVIDIA H100 80GB HBM3``, ``2 x NVIDIA A100-SXM4-40GB`` or
    ``CPU (2 cores, <model>)``."""
    if gpus:
        name = gpus[0]["name"]
        return f"{len(gpus)} x {name}" if len(gpus) > 1 else name
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores{', ' + model if model else ''})"


def choose_precision(setting: bool | str, gpus: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(Keras dtype policy, warning or None) for the ``mixed_precision`` param on a machine
    with ``gpus``: ``auto`` is float16 compute where every GPU has compute capability 7.0 or
    more (tensor cores), float32 otherwise; ``true`` on any GPU (a warning without one: CPUs
    gain nothing from float16); ``false`` float32."""
    if setting is False:
        return FLOAT_POLICY, None
    if setting is True:
        return (MIXED_POLICY, None) if gpus else (FLOAT_POLICY, CPU_PRECISION_WARNING)
    capable = bool(gpus) and all(tuple(gpu.get("compute_capability") or (0, 0)) >= (7, 0)
                                 for gpu in gpus)
    return (MIXED_POLICY if capable else FLOAT_POLICY), None


def set_precision_policy(mixed_precision: bool | str,
                         gpus: list[dict[str, Any]] | None = None) -> str:
    """Set Keras' global dtype policy for the models built next (see
    :func:`choose_precision`; the softmax outputs of :mod:`foodtransfer.models` stay float32)
    and return its name."""
    import keras

    policy, warning = choose_precision(mixed_precision,
                                       visible_gpus() if gpus is None else gpus)
    if warning:
        log.warning(warning)
    keras.mixed_precision.set_global_policy(policy)
    return policy


def seed_everything(seed: int) -> None:
    """Same params, same machine -> same metrics."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


@dataclass(frozen=True)
class TrainingSetup:
    """How a training stage trains: its ``tf.distribute`` strategy, Keras precision policy and
    the device(s) it runs on."""

    strategy: Any
    precision_policy: str
    device: str = "unknown"

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    def record(self) -> dict[str, Any]:
        """What the metrics file (and, where numeric, MLflow's metrics) say about it."""
        return {"replicas": self.replicas, "precision_policy": self.precision_policy,
                "device": self.device}

    def tags(self) -> dict[str, str]:
        return {"replicas": str(self.replicas), "precision_policy": self.precision_policy,
                "device": self.device}


def prepare_training(params: Params) -> TrainingSetup:
    """The strategy and precision policy of ``params``, set up before any model is built,
    and every random generator seeded."""
    configure_gpus()
    # The strategy first: MultiWorkerMirroredStrategy must exist before other TensorFlow ops.
    strategy = make_strategy(params.strategy)
    gpus = visible_gpus()
    policy = set_precision_policy(params.mixed_precision, gpus)
    seed_everything(params.seed)
    return TrainingSetup(strategy, policy, device_name(gpus))
