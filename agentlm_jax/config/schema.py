"""Every configuration of the stack as typed, frozen dataclasses: the ONE source of defaults.

The defaults describe the CPU demo (the tiny model on the bundled sample, `python -m agentlm_jax.train` with
no arguments); a YAML file states only what differs (`configs/tiny.yaml` resolves to exactly these, a test
checks it). Each choice list below exists once; code that needs it imports it from here. Values are checked
when a config is built, and every error names the key.

Dimension letters of the model fields (used in every einsum of the model and ops):
  B batch · T query length · S key/value length · D hidden_size · F intermediate_size
  N query heads · K key/value heads · H head dim · V vocabulary · L layers
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from agentlm_jax.errors import ConfigError
from data_pipeline.formats.dataset import SAMPLE_DATASET_DIR

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "save_dots")
ATTENTION_IMPLS = ("auto", "blockwise", "splash", "flash", "xla", "cudnn")
LOSS_IMPLS = ("auto", "full", "chunked", "vocab_parallel")
OVERLONG_POLICIES = ("truncate", "drop")
EXPORT_DTYPES = ("bfloat16", "float16", "float32")
# Model families (ModelConfig.architecture): Hugging Face LlamaForCausalLM (Llama 2, 3, 3.1, 3.2) and
# Qwen2ForCausalLM (Qwen 2.5: biases on the q/k/v projections).
ARCHITECTURES = ("llama", "qwen2")
ROPE_TYPES = ("default", "llama3")  # RopeScaling.rope_type: none (Llama 2, Qwen 2.5), or Llama 3.1's
DISTRIBUTED_MODES = ("auto", "on", "off")
# Fields of ModelConfig that say how to run the model, not what it is: never read from or written to an HF
# config.json, and free to differ between a checkpoint and the run that loads it.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "attention_impl", "attention_block_size",
                  "splash_block_size")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ------------------------------------------------------------------------------------------------- model
@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling, Hugging Face's `rope_scaling` / `rope_parameters`. `default`: none (Llama 2,
    Qwen 2.5; the other fields are then unused). `llama3` (Llama 3.1 / 3.2): wavelengths longer than
    original_max_position_embeddings / low_freq_factor are stretched by `factor`, those shorter than
    original_max_position_embeddings / high_freq_factor kept, the ones between interpolated smoothly. The
    defaults of the other fields are Llama 3.1's, so `{rope_type: llama3}` alone is its scaling."""

    rope_type: str = "default"  # one of ROPE_TYPES
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        _require(self.rope_type in ROPE_TYPES,
                 f"model.rope_scaling.rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        if self.rope_type == "llama3":
            _require(self.factor > 0 and 0 < self.low_freq_factor < self.high_freq_factor
                     and self.original_max_position_embeddings > 0,
                     "model.rope_scaling (llama3) needs factor > 0, 0 < low_freq_factor < high_freq_factor and "
                     f"original_max_position_embeddings > 0, got {self}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family architecture (Llama 2 by default; Llama 3.x and Qwen 2.5 by `architecture`,
    `rope_scaling` and `tie_word_embeddings`) and how to run it. hf/config.py maps it to and from a Hugging
    Face config.json."""

    vocab_size: int = 1024
    hidden_size: int = 128  # D
    intermediate_size: int = 344  # F
    num_layers: int = 4  # L
    num_heads: int = 4  # N (query heads)
    num_kv_heads: int = 2  # K (key/value heads; K < N is grouped-query attention)
    head_dim: int | None = None  # H; None means hidden_size // num_heads
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    # llama (LlamaForCausalLM) or qwen2 (Qwen2ForCausalLM, whose q/k/v projections have biases: qkv_bias)
    architecture: str = "llama"
    rope_scaling: RopeScaling = RopeScaling()
    # the output head is the token embedding's transpose (no lm_head parameter): Llama 3.2 1B/3B, small Qwen 2.5
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of the (master) parameters
    remat: str = "none"  # one of REMAT_POLICIES
    scan_layers: bool = True
    # auto: what agentlm_jax.ops picks for the backend (blockwise on CPU; splash on TPU; cuDNN if it can on GPU);
    # blockwise (the CPU kernel), splash (the Pallas TPU kernel), flash (the Pallas GPU kernel), or
    # jax.nn.dot_product_attention's xla or cudnn.
    attention_impl: str = "auto"
    attention_block_size: int = 128  # query/key block of the blockwise attention and the GPU flash kernel
    splash_block_size: int = 512  # query/key block of the splash kernel (a multiple of 128; MaxText's default)
    bos_token_id: int = 1
    eos_token_id: int = 2
    # further ids that end a turn, e.g. Llama 3.1's <|eom_id|> and <|eot_id|> (config.json: "eos_token_id": [128001,
    # 128008, 128009]); generation stops at any of `stop_token_ids`
    extra_eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # ModelConfig(**yaml_section) gives a mapping
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        object.__setattr__(self, "extra_eos_token_ids", tuple(self.extra_eos_token_ids))  # (YAML gives a list)
        _require(self.architecture in ARCHITECTURES,
                 f"model.architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        _require(self.remat in REMAT_POLICIES, f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        for name in ("dtype", "param_dtype"):
            _require(getattr(self, name) in DTYPES, f"model.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        _require(self.attention_impl in ATTENTION_IMPLS,
                 f"model.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        _require(self.attention_block_size >= 1,
                 f"model.attention_block_size must be positive, got {self.attention_block_size}")
        _require(self.splash_block_size >= 128 and self.splash_block_size % 128 == 0,
                 f"model.splash_block_size must be a positive multiple of 128, got {self.splash_block_size}")
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.num_kv_heads})")
        _require(self.head_dim is not None or self.hidden_size % self.num_heads == 0,
                 f"model.hidden_size ({self.hidden_size}) is not divisible by model.num_heads ({self.num_heads}); "
                 f"set model.head_dim")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: eos_token_id, then extra_eos_token_ids."""
        return tuple(dict.fromkeys((self.eos_token_id, *self.extra_eos_token_ids)))

    @property
    def qkv_bias(self) -> bool:
        """Whether q/k/v projections have biases: always for Qwen2 (as its Hugging Face model), never for Llama."""
        return self.architecture == "qwen2"


# -------------------------------------------------------------------------------------------------- mesh
MESH_AXES = ("data", "fsdp", "tensor")
MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Logical axis name -> mesh axes (see sharding.py). Activations first, then parameters.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("lora_rank", None),  # the rank axis of LoRA adapters (agentlm_jax/model/lora.py): small, replicated
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (-1 = all remaining devices; at most one -1) and the logical -> mesh axis rules."""

    data: int = 1  # pure data parallelism (parameters replicated)
    fsdp: int = -1  # data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
    tensor: int = 1  # tensor parallelism over heads, MLP width and vocabulary
    rules: Rules = DEFAULT_RULES

    def __post_init__(self):
        # YAML gives lists; normalise to hashable tuples so configs compare and hash.
        norm = tuple((str(k), tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in self.rules)
        object.__setattr__(self, "rules", norm)
        for logical, axes in self.rules:
            for ax in (axes,) if isinstance(axes, str) else (axes or ()):
                _require(ax in MESH_AXES, f"mesh.rules maps {logical!r} to unknown mesh axis {ax!r}; "
                                          f"mesh axes are {MESH_AXES}")
        sizes = self.sizes
        bad = [f"mesh.{axis}={size}" for axis, size in sizes.items() if size != -1 and size < 1]
        _require(not bad, f"{', '.join(bad)}: a mesh axis size must be a positive number of devices, or -1 for all "
                          "the remaining devices")
        rest = [f"mesh.{axis}" for axis, size in sizes.items() if size == -1]
        _require(len(rest) <= 1, f"{' and '.join(rest)} are both -1 (\"all remaining devices\"): at most one axis may "
                                 "be -1; give the others explicit sizes, e.g. mesh.data=1 mesh.fsdp=-1 mesh.tensor=1")

    @property
    def sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in MESH_AXES}

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) over `num_devices`, the -1 axis filled in; ConfigError if they do not fit."""
        sizes = list(self.sizes.values())
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            _require(num_devices % known == 0,
                     f"mesh: {num_devices} devices cannot be split with fixed axes of product {known}")
            sizes[sizes.index(-1)] = num_devices // known
        _require(math.prod(sizes) == num_devices, f"mesh data×fsdp×tensor = {sizes} uses {math.prod(sizes)} "
                                                  f"devices, but there are {num_devices}")
        return tuple(sizes)


# -------------------------------------------------------------------------------------------- training
@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = SAMPLE_DATASET_DIR  # a data_pipeline output dir (local or gs://); the sample is built here if missing
    global_batch: int = 2  # packed sequences per optimizer step, over all hosts
    max_seq_len: int = 1024  # the sample's agent conversations are 360-1,180 tokens long
    micro_batches: int = 1  # gradient accumulation: the global batch is processed in this many pieces
    # Rows open at once for first-fit packing; None: max(rows per batch, 64). More bins, less padding (uniform
    # 20..1500-token conversations in 2048: 84% of positions used with 8 bins, 96% with 128).
    packing_bins: int | None = None
    overlong: str = "truncate"  # conversations longer than max_seq_len + 1 tokens: "truncate" or "drop"
    # Threads reading and decoding records; None: 16 for remote (gs://) files, whose reads are latency-bound,
    # 2 for local ones, whose decoding holds the GIL.
    read_threads: int | None = None
    prefetch_batches: int = 2  # batches prepared ahead in a background thread (0: none)

    def bins_for(self, rows_per_batch: int) -> int:
        return self.packing_bins or max(rows_per_batch, 64)

    def threads_for(self, paths: list[str]) -> int:
        if self.read_threads is not None:
            return self.read_threads
        return 16 if any("://" in p and not p.startswith("file://") for p in paths) else 2


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with a linear-warmup cosine schedule (see `training.optimizer.learning_rate_schedule` for the exact
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
    backward pass, so only [B,chunk,V] logits ever exist. vocab_parallel: a shard_map in which every shard of
    the vocabulary's mesh axis computes its own slice of the logits (never gathering the full vocabulary);
    chunked too when chunk_size is set. auto (resolved by `ops.cross_entropy.resolve_impl`): vocab_parallel
    when the vocabulary is split over several devices, else chunked when chunk_size is set and smaller than
    max_seq_len, else full.
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
    # Also save when this many minutes have passed since the last save (asynchronous, so training goes on):
    # bounds what a preemption or a crash costs, whatever the step time. None: by steps only.
    every_minutes: float | None = None


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 10  # metrics.jsonl / TensorBoard / progress-bar postfix
    eval_every_steps: int = 50  # validation loss per task; 0 = only at the end; -1 = never
    eval_batches: int | None = 8  # validation batches per evaluation (None: the whole split)
    tensorboard: bool = True
    progress_bar: bool = True  # a bar on a terminal; plain progress lines with an ETA in a log file
    # Upload metrics.jsonl, TensorBoard event files and the workers' logs of a gs:// run dir this often (and
    # at every checkpoint); local files are flushed as they are written.
    sync_every_s: float = 60.0
    # Peak FLOP/s of one device, the MFU denominator. None: the known bf16 peak of the TPU/GPU kind, or on CPU
    # a float32 matmul peak measured at start-up (about a second).
    peak_flops_per_device: float | None = None


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    enabled: bool = True  # write a Hugging Face checkpoint when training ends
    path: str | None = None  # None: {run_dir}/hf
    dtype: str = "bfloat16"  # one of EXPORT_DTYPES
    max_shard_size: str = "5GB"


# Suites agentlm_jax.evaluation.in_loop can run between training steps (docs/evaluation.md).
IN_LOOP_SUITES = ("actions", "dbbench", "general")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Agent evaluation inside training (agentlm_jax.evaluation.in_loop): greedy KV-cache generation on the model
    being trained. Results go to metrics.jsonl, TensorBoard (eval/actions/<task>/accuracy, eval/dbbench/success,
    ...) and the progress log; its time is excluded from tokens/s; a failure is logged and retried next time."""

    every_steps: int = 50  # 0: only at the end of the run; -1: never
    suites: tuple[str, ...] = ("actions",)  # any of IN_LOOP_SUITES
    # actions: loss-carrying turns per task (from the validation split); dbbench, general: items (the package's
    # samples unless a path below is given)
    max_items: int = 4
    # per generated turn of every suite (actions: also at most the gold turn's length + 32); the bundled
    # sample's gold turns run to 87 tokens, so less would cut a perfect answer before its action
    max_new_tokens: int = 128
    batch_size: int = 8  # prompts decoded together
    split: str = "validation"  # actions: the split of data.path to read (validation or train)
    db_items: str | None = None  # dbbench: an AgentBench dbbench JSONL; None: the package's sample
    mmlu: str | None = None  # general: an MMLU-format JSONL; None: the package's sample
    gsm8k: str | None = None  # general: a GSM8K-format JSONL; None: the package's sample

    def __post_init__(self):
        suites = self.suites if isinstance(self.suites, (list, tuple)) else (self.suites,)
        object.__setattr__(self, "suites", tuple(suites))


# LoRA targets: the projections an adapter can be attached to (Hugging Face's module names: `{t}_proj`).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA fine-tuning (docs/lora.md): every target projection W gets W + (alpha / rank) · A · B, with A
    [in, rank] random and B [rank, out] zero at the start (so step 0 is the base model exactly). Only A and B are
    trained (AdamW state for them alone); the base weights are frozen, stored once in `base_dtype`."""

    enabled: bool = False
    rank: int = 16  # r
    alpha: float = 32.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0  # PEFT's lora_dropout: dropout on each adapter's input, in training only (0 ≤ p < 1)
    targets: tuple[str, ...] = LORA_TARGETS  # any of LORA_TARGETS (q, k, v, o: attention; gate, up, down: MLP)
    base_dtype: str = "bfloat16"  # storage dtype of the frozen base weights (one of DTYPES)
    init_adapter: str | None = None  # a PEFT adapter directory to continue training from; None: A random, B = 0
    adapter_path: str | None = None  # where the final PEFT adapter is written; None: {run_dir}/adapter

    def __post_init__(self):
        targets = self.targets if isinstance(self.targets, (list, tuple)) else (self.targets,)
        object.__setattr__(self, "targets", tuple(targets))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


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
    lora: LoraConfig = LoraConfig()
    eval: EvalConfig = EvalConfig()
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

    @property
    def adapter_path(self) -> str:
        return self.lora.adapter_path or f"{self.run_dir.rstrip('/')}/adapter"


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
        (cfg.checkpoint.every_minutes is None or cfg.checkpoint.every_minutes > 0,
         "checkpoint.every_minutes must be > 0 (or null: by steps only)"),
        (0 <= o.b1 < 1 and 0 <= o.b2 < 1 and o.eps > 0, "optimizer: need 0 <= b1, b2 < 1 and eps > 0"),
        (cfg.logging.every_steps > 0, "logging.every_steps must be > 0"),
        (cfg.export.dtype in EXPORT_DTYPES, f"export.dtype must be one of {EXPORT_DTYPES}"),
        (cfg.distributed in DISTRIBUTED_MODES, f"distributed must be one of {DISTRIBUTED_MODES}"),
    ]
    rules += lora_problems(cfg.lora) + eval_problems(cfg.eval)
    problems = [f"{key} = {value!r} is not a finite float32 number" for key, value in _float_fields(cfg)
                if not math.isfinite(value) or abs(value) > FLOAT32_MAX]
    problems += [msg for ok, msg in rules if not ok]
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def eval_problems(ev: EvalConfig) -> list[tuple[bool, str]]:
    unknown = [s for s in ev.suites if s not in IN_LOOP_SUITES]
    return [
        (ev.every_steps >= -1, f"eval.every_steps must be >= -1 (-1: never, 0: only at the end), got {ev.every_steps}"),
        (not unknown, f"eval.suites: unknown suite(s) {unknown}; the valid ones are {list(IN_LOOP_SUITES)} "
                      f"(e.g. eval.suites=[actions,dbbench])"),
        (ev.max_items > 0 and ev.max_new_tokens > 0 and ev.batch_size > 0,
         "eval.max_items, eval.max_new_tokens and eval.batch_size must be > 0"),
        (ev.split in ("validation", "train"), f"eval.split must be validation or train, got {ev.split!r}"),
    ]


def lora_problems(lo: LoraConfig) -> list[tuple[bool, str]]:
    unknown = [t for t in lo.targets if t not in LORA_TARGETS]
    return [
        (lo.rank > 0, f"lora.rank must be > 0, got {lo.rank}"),
        (lo.alpha > 0, f"lora.alpha must be > 0, got {lo.alpha}"),
        (0 <= lo.dropout < 1, f"lora.dropout must be in [0, 1), got {lo.dropout} (PEFT's lora_dropout, e.g. 0.05)"),
        (not unknown, f"lora.targets: unknown target(s) {unknown}; the valid ones are {list(LORA_TARGETS)} "
                      f"(e.g. lora.targets=[q,k,v,o,gate,up,down])"),
        (bool(lo.targets) and len(set(lo.targets)) == len(lo.targets),
         f"lora.targets must name at least one projection, each once; got {list(lo.targets)}"),
        (lo.base_dtype in DTYPES, f"lora.base_dtype must be one of {DTYPES}, got {lo.base_dtype!r}"),
    ]


FLOAT32_MAX = 3.4028234663852886e38  # np.finfo(np.float32).max: a larger value becomes inf on the device


def _float_fields(cfg: Any, prefix: str = "") -> list[tuple[str, float]]:
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += _float_fields(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            out.append((prefix + f.name, value))
    return out


# -------------------------------------------------------------------------------------------- generation
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How `inference.sampling` picks the next token: greedy, or sampling with temperature, top-k and top-p."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches p (1 = all)

    def __post_init__(self):
        _require(self.greedy or self.temperature > 0,
                 f"temperature must be > 0 when sampling (use greedy instead), got {self.temperature}")
        _require(self.top_k >= 0 and 0 < self.top_p <= 1,
                 f"need top_k >= 0 and 0 < top_p <= 1, got top_k={self.top_k} top_p={self.top_p}")
