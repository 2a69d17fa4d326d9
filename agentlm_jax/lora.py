"""LoRA runs outside the train step: the frozen base (loaded once, in `lora.base_dtype`, with a content hash),
PEFT adapter directories out and in, and the merged model.

    base, info = load_base(cfg, mesh, rules)           # init_from (HF dir) or random(seed); info: its reference
    export_peft(adapters, cfg.model, cfg.lora, dir)    # adapter_config.json + adapter_model.safetensors
    adapters = import_peft(dir, cfg.model, cfg.lora)   # continue training from a PEFT adapter
    merged = merged_params(base, adapters, ...)        # model/lora.py: W + alpha/r · A·B, for an HF export

A PEFT adapter directory is what `peft.PeftModel.from_pretrained(base_model, dir)` loads (no missing keys) and
what vLLM serves with `--enable-lora --lora-modules name=dir`: PEFT's tensor names
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` ([r, in]) and `...lora_B.weight` ([out, r]),
our A [in..., r] and B [r, out...] flattened and transposed as every Linear weight (hf/mapping.py).
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from agentlm_jax import distributed
from agentlm_jax.config.schema import DEFAULT_RULES, LORA_TARGETS, LoraConfig, ModelConfig, Rules, TrainConfig
from agentlm_jax.errors import ConfigError, MissingInputError
from agentlm_jax.hf import files
from agentlm_jax.model import lora as lora_lib

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model.layers"
# target → the Hugging Face module inside a decoder layer
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def peft_name(layer: int, target: str, which: str) -> str:
    """PEFT's tensor name of one adapter matrix (`which`: "A" or "B")."""
    return f"{PEFT_PREFIX}.{layer}.{HF_MODULES[target]}.lora_{which}.weight"


def target_modules(lora: LoraConfig) -> list[str]:
    return [f"{t}_proj" for t in LORA_TARGETS if t in lora.targets]


# ---------------------------------------------------------------------------------------------- the base
def load_base(cfg: TrainConfig, mesh: Mesh, rules: Rules, *, show_progress: bool = True) -> tuple[dict, dict]:
    """The frozen base parameters of a LoRA run (pure dict, on their shardings, in `lora.base_dtype`) and their
    reference: {"init_from", "seed", "base_dtype", "sha256"} (the seed only for a random base)."""
    from agentlm_jax.model.llama import init_model

    lora = cfg.lora
    if cfg.init_from:
        from agentlm_jax.hf import ArchitectureMismatchError, import_hf

        try:
            _, params = import_hf(cfg.init_from, base=cfg.model, runtime={"param_dtype": lora.base_dtype}, mesh=mesh,
                                  rules=rules, show_progress=show_progress)
        except ArchitectureMismatchError as e:
            raise ConfigError(f"init_from={cfg.init_from}: {e}") from None
    else:
        model = init_model(cfg.model.replace(param_dtype=lora.base_dtype), seed=cfg.seed, mesh=mesh, rules=rules)
        params = nnx.state(model, nnx.Param)
    base = params.to_pure_dict()
    info = {"init_from": cfg.init_from, "seed": None if cfg.init_from else cfg.seed, "base_dtype": lora.base_dtype,
            "sha256": lora_lib.base_fingerprint(base)}
    return base, info


def check_base(saved: dict | None, now: dict, where: str) -> None:
    """Refuse adapters trained over another base than the one loaded now (the content hashes differ)."""
    if not saved or saved.get("sha256") == now["sha256"]:
        return
    origin = saved.get("init_from") or f"random weights (seed {saved.get('seed')})"
    raise ConfigError(
        f"{where}: the LoRA adapters were trained over the base {origin} in {saved.get('base_dtype')} (content "
        f"sha256 {saved['sha256'][:12]}), but the base loaded now ({now['init_from'] or 'random, seed %s' % now['seed']}"
        f", {now['base_dtype']}) hashes to {now['sha256'][:12]}: point init_from (and lora.base_dtype) at the "
        f"base the run was trained on")


def merged_export_params(base: dict, adapters: dict, model_cfg: ModelConfig, lora: LoraConfig,
                         export_dtype: str) -> dict:
    """The merged model's parameters for an HF export of `export_dtype` (merged in float32, stored in the wider
    of the base's and the export's dtype, so nothing is rounded twice)."""
    dtype = jnp.promote_types(jnp.dtype(lora.base_dtype), jnp.dtype(export_dtype))
    merge = jax.jit(lambda b, a: lora_lib.merged_params(b, a, model_cfg, lora, dtype))
    return merge(base, adapters)


# ------------------------------------------------------------------------------------------ PEFT export
def adapter_config(lora: LoraConfig, base_model_name_or_path: str | None) -> dict[str, Any]:
    """PEFT's adapter_config.json of these adapters (a LoraConfig of peft, CAUSAL_LM)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": target_modules(lora),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "use_rslora": False, "use_dora": False, "revision": None,
    }


def _host(x) -> np.ndarray:
    return np.asarray(distributed.to_host(x) if isinstance(x, jax.Array) else x)


def _layer_arrays(adapters: dict, cfg: ModelConfig, target: str):
    """[(layer, A, B)] of one target on the host (float32 numpy), our layouts."""
    module, _ = lora_lib.TARGET_KERNELS[target]
    name = lora_lib.adapter_name(target)
    if cfg.scan_layers:
        ad = adapters["layers"][module][name]
        a, b = _host(ad["a"]), _host(ad["b"])
        return [(i, a[i], b[i]) for i in range(cfg.num_layers)]
    out = []
    for i in range(cfg.num_layers):
        ad = adapters["layers"][i][module][name]
        out.append((i, _host(ad["a"]), _host(ad["b"])))
    return out


def peft_tensors(adapters: dict, cfg: ModelConfig, lora: LoraConfig, dtype: str = "float32") -> dict[str, np.ndarray]:
    """PEFT's tensors of the adapters: lora_A [r, in] = A^T, lora_B [out, r] = B^T (flattened like the Linear)."""
    np_dtype = np.dtype(jnp.dtype(dtype))
    tensors = {}
    for t in (t for t in LORA_TARGETS if t in lora.targets):
        for i, a, b in _layer_arrays(adapters, cfg, t):
            R = a.shape[-1]
            tensors[peft_name(i, t, "A")] = np.ascontiguousarray(a.reshape(-1, R).T.astype(np_dtype))
            tensors[peft_name(i, t, "B")] = np.ascontiguousarray(b.reshape(R, -1).T.astype(np_dtype))
    return dict(sorted(tensors.items(), key=lambda kv: _order(kv[0])))


def _order(name: str):
    parts = name.split(".")
    return int(parts[4]), name


def export_peft(adapters: dict | nnx.State, cfg: ModelConfig, lora: LoraConfig, output_dir: str, *,
                base_model_name_or_path: str | None = None, dtype: str = "float32", overwrite: bool = False) -> dict:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors); only process 0 writes.
    A non-empty `output_dir` is refused unless `overwrite` (which replaces those two files, keeps the rest)."""
    from agentlm_jax.hf.save import check_output

    if isinstance(adapters, nnx.State):
        adapters = adapters.to_pure_dict()
    check_output(output_dir, overwrite=overwrite)
    tensors = peft_tensors(adapters, cfg, lora, dtype)
    config = adapter_config(lora, base_model_name_or_path)
    if jax.process_index() == 0:
        fs, root = files.fs_and_path(output_dir)
        fs.makedirs(root, exist_ok=True)
        files.write_safetensors(fs, posixpath.join(root, ADAPTER_WEIGHTS), tensors)
        files.write_text(fs, posixpath.join(root, ADAPTER_CONFIG), json.dumps(config, indent=2))
    return config


# ------------------------------------------------------------------------------------------ PEFT import
def read_adapter_config(adapter_dir: str) -> dict[str, Any]:
    fs, root = files.fs_and_path(adapter_dir)
    path = posixpath.join(root, ADAPTER_CONFIG)
    if not fs.exists(path):
        raise MissingInputError(f"lora.init_adapter={adapter_dir}: no {ADAPTER_CONFIG} there; point it at a PEFT "
                                f"adapter directory (what `PeftModel.save_pretrained` or this trainer writes)")
    with fs.open(path, "rt") as f:
        return json.load(f)


def check_adapter_config(config: dict[str, Any], lora: LoraConfig, where: str) -> None:
    """The PEFT adapter must be a plain LoRA of this run's rank, alpha and targets; each difference is named
    with the setting that matches it."""
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, only LORA is read")
    if config.get("r") != lora.rank:
        problems.append(f"r is {config.get('r')} (set lora.rank={config.get('r')})")
    if float(config.get("lora_alpha", -1)) != float(lora.alpha):
        problems.append(f"lora_alpha is {config.get('lora_alpha')} (set lora.alpha={config.get('lora_alpha')})")
    modules = config.get("target_modules")
    if not isinstance(modules, (list, tuple)):
        problems.append(f"target_modules is {modules!r}; only a list of module names is read")
    else:
        names = sorted(m.rsplit(".", 1)[-1] for m in modules)
        if names != sorted(target_modules(lora)):
            wanted = [m[:-len("_proj")] for m in names if m.endswith("_proj")]
            problems.append(f"target_modules are {names} (set lora.targets=[{','.join(wanted)}])")
    for key, plain in (("use_rslora", False), ("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if config.get(key, plain) != plain:
            problems.append(f"{key} is {config.get(key)!r}, only {plain!r} is supported")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
        if config.get(key):
            problems.append(f"{key} is set ({config.get(key)!r}), which is not supported")
    if problems:
        raise ConfigError(f"{where}: the PEFT adapter does not match this run's LoRA: " + "; ".join(problems))


def note_dropout(config: dict[str, Any], lora: LoraConfig, where: str) -> float:
    """The adapter's `lora_dropout` (0 when absent). Dropout changes how training continues, not what the
    tensors mean, so another value is not refused: it is logged (a warning) with the setting that matches it."""
    rate = float(config.get("lora_dropout") or 0.0)
    if rate != float(lora.dropout):
        log.warning("%s: the adapter was trained with lora_dropout=%s, this run continues with lora.dropout=%s (set "
                    "lora.dropout=%s to keep it)", where, rate, lora.dropout, rate)
    return rate


def import_peft(adapter_dir: str, cfg: ModelConfig, lora: LoraConfig, *, mesh: Mesh | None = None,
                rules: Rules = DEFAULT_RULES) -> nnx.State:
    """A PEFT adapter directory's A and B as our adapters (nnx.State, in `param_dtype`, each on its sharding)."""
    from agentlm_jax.hf.load import default_mesh
    from agentlm_jax.hf.mapping import CheckpointMismatchError
    from agentlm_jax.sharding import state_shardings

    where = f"lora.init_adapter={adapter_dir}"
    config = read_adapter_config(adapter_dir)
    check_adapter_config(config, lora, where)
    note_dropout(config, lora, where)
    fs, root = files.fs_and_path(adapter_dir)
    path = posixpath.join(root, ADAPTER_WEIGHTS)
    if not fs.exists(path):
        raise MissingInputError(f"{where}: no {ADAPTER_WEIGHTS} there")
    names = list(files.safetensors_header(fs, path))
    tensors = dict(files.iter_file_tensors(fs, "safetensors", path, names))
    abstract = lora_lib.abstract_adapters(cfg, lora)
    pure = abstract.to_pure_dict()
    expected, missing = set(), []
    pdt = np.dtype(jnp.dtype(cfg.param_dtype))

    def convert(name: str, shape: tuple[int, ...], which: str) -> np.ndarray:
        expected.add(name)
        if name not in tensors:
            missing.append(name)
            return np.zeros(shape, pdt)
        x = np.asarray(tensors[name])
        if which == "A":  # [r, in] -> [in..., r]
            want = (shape[-1], math.prod(shape[:-1]))
            if tuple(x.shape) != want:
                raise CheckpointMismatchError(f"{where}: {name} is {tuple(x.shape)}, expected {want}")
            return x.T.reshape(shape).astype(pdt)
        want = (math.prod(shape[1:]), shape[0])  # [out, r] -> [r, out...]
        if tuple(x.shape) != want:
            raise CheckpointMismatchError(f"{where}: {name} is {tuple(x.shape)}, expected {want}")
        return x.T.reshape(shape).astype(pdt)

    host: dict = jax.tree.map(lambda _: None, pure)
    for t in (t for t in LORA_TARGETS if t in lora.targets):
        module, _ = lora_lib.TARGET_KERNELS[t]
        name = lora_lib.adapter_name(t)
        for which, key in (("A", "a"), ("B", "b")):
            if cfg.scan_layers:
                shape = pure["layers"][module][name][key].shape[1:]
                host["layers"][module][name][key] = np.stack(
                    [convert(peft_name(i, t, which), shape, which) for i in range(cfg.num_layers)])
            else:
                for i in range(cfg.num_layers):
                    shape = pure["layers"][i][module][name][key].shape
                    host["layers"][i][module][name][key] = convert(peft_name(i, t, which), shape, which)
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointMismatchError(f"{where}: the adapter's tensors do not match lora.targets "
                                      f"{list(lora.targets)} and {cfg.num_layers} layers: missing {missing[:5]}"
                                      f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                                      f"{'...' if len(unexpected) > 5 else ''}")
    shardings = state_shardings(abstract, mesh or default_mesh(), rules).to_pure_dict()
    arrays = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]), host, shardings)
    nnx.replace_by_pure_dict(abstract, arrays)
    return abstract


def export_checkpoint_adapter(checkpoint_dir: str, output_dir: str, *, step: int | None = None,
                              overwrite: bool = False) -> dict:
    """A LoRA run's checkpoint (latest intact step by default) → a PEFT adapter directory."""
    from agentlm_jax.training.checkpointing import (CONFIG, PARAMS, Checkpointer, lora_config_from_run_info,
                                                    resolve_checkpoint_dir)

    with Checkpointer(resolve_checkpoint_dir(checkpoint_dir), read_only=True) as ckpt:
        if step is None:
            step = ckpt.usable_step(items=(CONFIG, PARAMS))
        step = ckpt._step_or_latest(step)
        info = ckpt.run_info(step)
        if not lora_config_from_run_info(info).enabled:
            raise ConfigError(f"--peft: the checkpoints in {checkpoint_dir} are of a full fine-tuning run, not a LoRA "
                              f"one (lora.enabled=false); export the model without --peft")
        from agentlm_jax.config import TrainConfig
        from agentlm_jax.config.loading import from_dict
        from agentlm_jax.hf.load import default_mesh
        from agentlm_jax.training.state import abstract_params

        run_cfg = from_dict(TrainConfig, info["config"])
        abstract = abstract_params(run_cfg.model, run_cfg.lora).to_pure_dict()
        device = jax.sharding.SingleDeviceSharding(default_mesh().devices.flat[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
        adapters = ckpt.restore_params(step, target)
    base_ref = (info.get("lora_base") or {}).get("init_from")
    return export_peft(adapters, run_cfg.model, run_cfg.lora, output_dir, base_model_name_or_path=base_ref,
                       overwrite=overwrite)
