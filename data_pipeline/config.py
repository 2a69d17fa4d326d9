"""The pipeline's configuration: typed dataclasses, loaded from `configs/data/*.yaml`, overridden by flags.

The dataclass defaults are the one source of defaults: they build the embedded sample dataset
(`configs/data/sample.yaml` spells the same values out, and a test keeps the two equal).

Paths may use environment variables (`${BUCKET}`) and `${SAMPLE_DATA}`, the directory of the bundled
sample files.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import yaml

from data_pipeline.formats.chat_template import DEFAULT_SYSTEM_PROMPT
from data_pipeline.formats.dataset import SAMPLE_DATASET_DIR

SAMPLE_DATA = str(Path(__file__).resolve().parent / "sample_data")
SOURCE_FORMATS = ("auto", "jsonl", "json", "parquet", "hf")
RECORD_FORMATS = ("auto", "sharegpt", "openai")  # (normalize.py applies them)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def expand_path(path: str) -> str:
    """`${SAMPLE_DATA}` and other environment variables; `~`."""
    env = {**os.environ, "SAMPLE_DATA": SAMPLE_DATA}
    expanded = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m[1] or m[2], m[0]), path)
    return os.path.expanduser(expanded)


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One input: local/gs:// file, directory or glob (JSONL, JSON array, Parquet) or a Hugging Face dataset id.

    `name` identifies the source in the manifest, in hashing (sampling is keyed on (seed, name, id)) and,
    for general sources, is the records' task. `splits` chooses Hugging Face splits (empty = all). `format` is
    the file type; `record_format` the records' turn layout: auto (detected per record), sharegpt
    (`conversations` of from/value turns: ShareGPT, AgentInstruct, LLaMA-Factory's tool turns) or openai
    (`messages` of role/content messages with tool_calls); a record of another layout is rejected.
    """
    path: str
    name: str = ""
    format: str = "auto"
    splits: tuple[str, ...] = ()
    record_format: str = "auto"

    def __post_init__(self):
        if self.format not in SOURCE_FORMATS:
            raise ValueError(f"source {self.path}: format must be one of {SOURCE_FORMATS}, got {self.format!r}")
        if self.record_format not in RECORD_FORMATS:
            raise ValueError(f"source {self.path}: record_format must be one of {RECORD_FORMATS}, got "
                             f"{self.record_format!r}")
        if not self.name:
            object.__setattr__(self, "name", default_source_name(self.path))
        if not _NAME_RE.match(self.name):
            raise ValueError(f"source name {self.name!r} may only use letters, digits, '_', '.', '-'")
        object.__setattr__(self, "splits", tuple(self.splits))

    @classmethod
    def parse(cls, spec: str) -> "SourceConfig":
        """CLI form: `[NAME=]PATH` or `[NAME=][hf:]OWNER/DATASET[:SPLIT,SPLIT]`."""
        name = ""
        head, sep, rest = spec.partition("=")
        if sep and _NAME_RE.match(head):
            name, spec = head, rest
        fmt, splits = "auto", ()
        if spec.startswith("hf:"):
            fmt, spec = "hf", spec[3:]
        if "://" not in spec and ":" in spec:
            spec, _, split_list = spec.partition(":")
            splits = tuple(s for s in split_list.split(",") if s)
            fmt = "hf"
        return cls(path=spec, name=name, format=fmt, splits=splits)

    @classmethod
    def from_yaml(cls, value) -> "SourceConfig":
        if isinstance(value, str):
            return cls.parse(value)
        if not isinstance(value, dict):
            raise ValueError(f"a source is a string or a mapping, got {value!r}")
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"source {value}: unknown keys {sorted(unknown)}")
        return cls(**{**value, "splits": tuple(value.get("splits") or ())})


def default_source_name(path: str) -> str:
    base = path.rstrip("/").rsplit("/", 1)[-1] if "://" in path or "/" in path else path
    if not os.path.splitext(base)[1] and path.count("/") == 1 and "://" not in path:
        base = path.replace("/", "_")  # a hub id owner/name
    for ext in (".gz", ".jsonl", ".json", ".parquet"):
        base = base[: -len(ext)] if base.endswith(ext) else base
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", base.replace("*", "")).strip("_.-")
    return name or "source"


def _agenttuning_thresholds() -> dict[str, float]:
    return {"default": 1.0, "mind2web": 2 / 3}


def _sample_agent() -> tuple[SourceConfig, ...]:
    return (SourceConfig(f"{SAMPLE_DATA}/agentinstruct_sample.jsonl", name="agentinstruct"),)


def _sample_general() -> tuple[SourceConfig, ...]:
    return (SourceConfig(f"{SAMPLE_DATA}/sharegpt_gpt4_sample.jsonl", name="sharegpt_gpt4"),
            SourceConfig(f"{SAMPLE_DATA}/sharegpt_gpt35_sample.json", name="sharegpt_gpt35"))


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    agent: tuple[SourceConfig, ...] = dataclasses.field(default_factory=_sample_agent)
    general: tuple[SourceConfig, ...] = dataclasses.field(default_factory=_sample_general)
    # Sub-mix of the general sources (same order); empty = in proportion to their kept pool sizes.
    general_weights: tuple[float, ...] = (0.2, 0.8)
    tokenizer: str = f"{SAMPLE_DATA}/tiny_tokenizer"
    eta: float = 0.2  # agent / (agent + general) examples
    max_seq_len: int = 1024  # the tiny default model's context; the paper's 4096: configs/data/agenttuning.yaml
    validation_fraction: float = 0.05  # per task
    num_shards: int = 4  # train split
    num_validation_shards: int = 1
    seed: int = 0
    output: str = SAMPLE_DATASET_DIR
    # None: the template's default: the paper's DEFAULT_SYSTEM_PROMPT for llama2; none for a Jinja template, which
    # then writes its own default (as a server does when a client sends no system message). "" = none at all.
    system_prompt: str | None = None
    # A record with a reward is kept when reward >= its task's threshold ("default" for other tasks).
    reward_thresholds: dict[str, float] = dataclasses.field(default_factory=_agenttuning_thresholds)
    tokenize_batch_size: int = 256  # records per batch from reader to encoder: one tokenizer call each
    # llama2 (chat_template.py), hf (the tokenizer's own Jinja template) or a Jinja file (formats/hf_template.py)
    chat_template: str = "llama2"
    # The build fails when more than this fraction of the records read are rejected by the template's
    # contract check (template_not_prefix_stable, template_mismatch).
    max_template_reject_fraction: float = 0.01

    def __post_init__(self):
        for key in ("agent", "general", "general_weights"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        object.__setattr__(self, "reward_thresholds", {str(k): float(v) for k, v in self.reward_thresholds.items()})
        self.validate()

    def validate(self) -> None:
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if not self.agent and not self.general:
            raise ValueError("no sources: give at least one --agent or --general source")
        if self.general_weights and len(self.general_weights) != len(self.general):
            raise ValueError(f"--general-weights has {len(self.general_weights)} values for "
                             f"{len(self.general)} general sources")
        if any(w < 0 for w in self.general_weights) or (self.general_weights and sum(self.general_weights) <= 0):
            raise ValueError(f"general weights must be >= 0 with a positive sum, got {self.general_weights}")
        names = [s.name for s in self.agent + self.general]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique (rename with NAME=PATH), got {names}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.num_shards < 1 or self.num_validation_shards < 1:
            raise ValueError("num_shards and num_validation_shards must be >= 1")
        if self.max_seq_len < 8:
            raise ValueError(f"max_seq_len must be >= 8, got {self.max_seq_len}")
        if "default" not in self.reward_thresholds:
            raise ValueError("reward_thresholds needs a 'default' entry")
        if self.tokenize_batch_size < 1:
            raise ValueError("tokenize_batch_size must be >= 1")
        if not self.chat_template:
            raise ValueError("chat_template must be llama2, hf or the path of a Jinja file")
        if not 0.0 <= self.max_template_reject_fraction <= 1.0:
            raise ValueError(f"max_template_reject_fraction must be in [0, 1], got {self.max_template_reject_fraction}")

    @property
    def effective_system_prompt(self) -> str | None:
        """The system prompt of records without one (what the manifest records as `system_prompt`)."""
        if self.system_prompt is not None:
            return self.system_prompt or None
        return DEFAULT_SYSTEM_PROMPT if self.chat_template == "llama2" else None

    def reward_threshold(self, task: str) -> float:
        return self.reward_thresholds.get(task, self.reward_thresholds["default"])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "PipelineConfig":
        return dataclasses.replace(self, **changes)


def config_from_dict(raw: dict) -> PipelineConfig:
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown pipeline config keys {sorted(unknown)}; known: {sorted(known)}")
    values = dict(raw)
    for key in ("agent", "general"):
        if key in values:
            values[key] = tuple(_expand_source(SourceConfig.from_yaml(v)) for v in values[key] or ())
    for key in ("tokenizer", "output"):
        if key in values:
            values[key] = expand_path(str(values[key]))
    if values.get("chat_template") not in (None, "llama2", "hf"):
        values["chat_template"] = expand_path(str(values["chat_template"]))
    if "general_weights" in values:
        values["general_weights"] = tuple(float(w) for w in values["general_weights"] or ())
    if "reward_thresholds" in values:
        values["reward_thresholds"] = {**_agenttuning_thresholds(), **(values["reward_thresholds"] or {})}
    return PipelineConfig(**values)


def _expand_source(source: SourceConfig) -> SourceConfig:
    return dataclasses.replace(source, path=expand_path(source.path))


def load_config(path: str | None) -> PipelineConfig:
    if path is None:
        return PipelineConfig()
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of pipeline options")
    try:
        return config_from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e
