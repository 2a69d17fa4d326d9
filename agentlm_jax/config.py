"""The training run's configuration: typed dataclasses, loaded from YAML with dotted `key=value` overrides.

    cfg = load_config("configs/llama2-7b.yaml", ["optimizer.learning_rate=2e-5", "mesh.tensor=4"])

The dataclass defaults below are the ONE source of defaults, and they describe the CPU demo (the tiny model
on the bundled sample data, `python -m agentlm_jax.train` with no arguments). A YAML file only states what
differs from them; `tests/test_config.py` checks that `configs/tiny.yaml` resolves to exactly these
defaults. Unknown keys, wrong types and impossible combinations are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import io
import types
import typing
from typing import Any, Sequence

import fsspec
import yaml

from agentlm_jax.model.config import ModelConfig
from agentlm_jax.sharding import MeshConfig

LOSS_IMPLS = ("auto", "full", "chunked", "vocab_parallel")
DISTRIBUTED_MODES = ("auto", "on", "off")
OVERLONG_POLICIES = ("truncate", "drop")
EXPORT_DTYPES = ("bfloat16", "float16", "float32")


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or inconsistent; the message names the key."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = "data/sample"  # a data_pipeline output dir (local or gs://); the default is built if missing
    global_batch: int = 2  # packed sequences per optimizer step, over all hosts
    max_seq_len: int = 1024  # the sample's agent conversations are 360-1,180 tokens long
    micro_batches: int = 1  # gradient accumulation: the global batch is processed in this many pieces
    packing_bins: int | None = None  # rows open at once for first-fit packing (None: the input pipeline's)
    overlong: str = "truncate"  # conversations longer than max_seq_len + 1 tokens: "truncate" or "drop"
    read_threads: int | None = None  # None: 16 for gs://, 2 for local files
    prefetch_batches: int = 2


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with a linear-warmup cosine schedule (see `optimizer.learning_rate_schedule` for the exact
    formula): the learning rate rises to `learning_rate` over `warmup_fraction` of the steps, then follows a
    half cosine to `min_learning_rate`, reached at `decay_fraction` of the steps and kept to the end."""

    learning_rate: float = 3e-3  # peak
    min_learning_rate: float = 0.0
    warmup_fraction: float = 0.02
    decay_fraction: float = 0.9
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled (AdamW); never on norm scales
    decay_embedding: bool = True  # decay the token embedding too (as Megatron-LM, the paper's trainer, does)
    clip_norm: float = 1.0  # global gradient-norm clipping; 0 turns it off


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """How the token cross-entropy is computed (all give the same value; they differ in memory and speed).

    full: [B,T,V] float32 logits at once. chunked: `chunk_size` positions at a time, recomputed in the
    backward pass, so only [B,chunk,V] logits ever exist. vocab_parallel: a shard_map in which every `tensor`
    shard computes its own vocabulary slice of the logits (never gathering the full vocabulary); chunked too
    when chunk_size is set. auto: vocab_parallel when mesh.tensor > 1, else chunked when chunk_size is set
    and smaller than max_seq_len, else full.
    """

    impl: str = "auto"
    chunk_size: int | None = None  # sequence positions per chunk (must divide max_seq_len); None: no chunking


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 50  # also saved at the end, and on SIGTERM (preemption)
    keep: int = 2  # the latest checkpoints kept
    async_save: bool = True  # write in the background while training continues
    resume: bool = True  # continue from the latest checkpoint in run_dir/checkpoints if there is one
    # Arrays in one OCDBT database per process (orbax's default: few large files, fast on GCS). false: a file
    # per array chunk, for object stores that do not report object generations (the gcp-storage-emulator).
    ocdbt: bool = True


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 10  # metrics.jsonl / TensorBoard / progress-bar postfix
    eval_every_steps: int = 50  # validation loss per task; 0 = only at the end; -1 = never
    eval_batches: int | None = 8  # validation batches per evaluation (None: the whole split)
    tensorboard: bool = True
    progress_bar: bool = True
    # Peak FLOP/s of one device, the MFU denominator. None: the known bf16 peak of the TPU/GPU kind, or on CPU
    # a float32 matmul peak measured at start-up (about a second).
    peak_flops_per_device: float | None = None


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    enabled: bool = True  # write a Hugging Face checkpoint when training ends
    path: str | None = None  # None: {run_dir}/hf
    dtype: str = "bfloat16"
    max_shard_size: str = "5GB"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = ModelConfig(max_position_embeddings=1024)  # the tiny model of configs/tiny.yaml
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    export: ExportConfig = ExportConfig()
    run_dir: str = "runs/tiny"  # checkpoints/, metrics.jsonl, tensorboard/, config.yaml, hf/ (local or gs://)
    steps: int = 150  # optimizer steps
    seed: int = 0  # parameter init (random) and data order
    init_from: str | None = None  # a Hugging Face Llama directory (local or gs://); None: random init
    distributed: str = "auto"  # jax.distributed.initialize(): auto (on TPU pods / cluster env), on, off

    def __post_init__(self):
        check(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def micro_batch(self) -> int:
        return self.data.global_batch // self.data.micro_batches

    @property
    def export_path(self) -> str:
        return self.export.path or f"{self.run_dir.rstrip('/')}/hf"

    @property
    def checkpoint_dir(self) -> str:
        return f"{self.run_dir.rstrip('/')}/checkpoints"


def check(cfg: TrainConfig) -> None:
    """Cross-field checks (each field's type is checked when the config is built from a dict)."""
    d, o, lo = cfg.data, cfg.optimizer, cfg.loss
    rules = [
        (cfg.steps > 0, "steps must be > 0"),
        (d.global_batch > 0 and d.max_seq_len > 1, "data.global_batch must be > 0 and data.max_seq_len > 1"),
        (d.micro_batches > 0 and d.global_batch % d.micro_batches == 0,
         f"data.global_batch ({d.global_batch}) must be a multiple of data.micro_batches ({d.micro_batches})"),
        (d.overlong in OVERLONG_POLICIES, f"data.overlong must be one of {OVERLONG_POLICIES}"),
        (d.max_seq_len <= cfg.model.max_position_embeddings,
         f"data.max_seq_len ({d.max_seq_len}) exceeds model.max_position_embeddings "
         f"({cfg.model.max_position_embeddings})"),
        (o.learning_rate >= 0 and 0 <= o.min_learning_rate <= o.learning_rate,
         "optimizer: need 0 <= min_learning_rate <= learning_rate"),
        (0 <= o.warmup_fraction <= o.decay_fraction <= 1,
         "optimizer: need 0 <= warmup_fraction <= decay_fraction <= 1"),
        (o.clip_norm >= 0 and o.weight_decay >= 0, "optimizer.clip_norm and weight_decay must be >= 0"),
        (lo.impl in LOSS_IMPLS, f"loss.impl must be one of {LOSS_IMPLS}"),
        (lo.chunk_size is None or (lo.chunk_size > 0 and d.max_seq_len % lo.chunk_size == 0),
         f"loss.chunk_size ({lo.chunk_size}) must divide data.max_seq_len ({d.max_seq_len})"),
        (lo.impl != "chunked" or lo.chunk_size, "loss.impl=chunked needs loss.chunk_size"),
        (cfg.checkpoint.every_steps > 0 and cfg.checkpoint.keep > 0,
         "checkpoint.every_steps and checkpoint.keep must be > 0"),
        (cfg.logging.every_steps > 0, "logging.every_steps must be > 0"),
        (cfg.export.dtype in EXPORT_DTYPES, f"export.dtype must be one of {EXPORT_DTYPES}"),
        (cfg.distributed in DISTRIBUTED_MODES, f"distributed must be one of {DISTRIBUTED_MODES}"),
    ]
    problems = [msg for ok, msg in rules if not ok]
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------ dict <-> config
def to_dict(cfg: Any) -> Any:
    """A plain (YAML/JSON-able) nested dict of a config; tuples become lists."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, starting from its defaults; every value is type-checked."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(_join(where, k) for k in unknown)}; "
                          f"{where or 'the top level'} has: {', '.join(sorted(names))}")
    base = cls()
    kwargs = {}
    for name, value in values.items():
        key = _join(where, name)
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping (a config section), got {value!r}")
            kwargs[name] = from_dict(hints[name], {**to_dict(getattr(base, name)), **value}, key)
        else:
            kwargs[name] = _coerce(value, hints[name], key)
    try:
        return dataclasses.replace(base, **kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp` (int, float, str, bool, X | None, tuple[...]), or a ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args or (Any,) * len(value))))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else _bad(key, value, tp)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    return _bad(key, value, tp)


def _bad(key: str, value: Any, tp: Any):
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{key}: expected {name}, got {value!r} ({type(value).__name__})")


# ---------------------------------------------------------------------------------------- YAML and overrides
def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """['optimizer.learning_rate=1e-5', 'mesh.tensor=2'] -> a nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optimizer.learning_rate=1e-5)")
        value = yaml.safe_load(raw) if raw.strip() else None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set to a value and used as a section")
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str) -> dict[str, Any]:
    try:
        with fsspec.open(path, "rt") as f:
            values = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return values or {}


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The defaults, updated by the YAML file at `path` (if any), then by the dotted `key=value` overrides."""
    values = read_yaml(path) if path else {}
    values = merge(values, parse_overrides(overrides))
    try:
        return from_dict(TrainConfig, values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def to_yaml(cfg: TrainConfig) -> str:
    buf = io.StringIO()
    yaml.safe_dump(to_dict(cfg), buf, sort_keys=False)
    return buf.getvalue()
