"""Hugging Face interop without PyTorch: Llama (2, 3.x) and Qwen2 (2.5) checkpoints in, the same out.

  config.py     our ModelConfig ↔ config.json (LlamaConfig, Qwen2Config), generation_config.json
  mapping.py    HF tensor names ↔ our parameter paths and layouts
  files.py      safetensors (and, when allowed, pickled) checkpoint files, local or gs://
  load.py       import onto a mesh, tensor by tensor, straight onto each parameter's sharding
  save.py       export as sharded safetensors + configs
  tokenizer.py  the tokenizer files of an export, with the training chat template
"""

from agentlm_jax.hf.config import CONFIG_NAME, ArchitectureMismatchError, hf_config, load_hf_config
from agentlm_jax.hf.files import PickleCheckpointError
from agentlm_jax.hf.load import import_hf, load_hf_model
from agentlm_jax.hf.mapping import CheckpointMismatchError
from agentlm_jax.hf.save import ExistingExportError, export_hf
from agentlm_jax.hf.tokenizer import save_tokenizer

__all__ = ["CONFIG_NAME", "ArchitectureMismatchError", "CheckpointMismatchError", "ExistingExportError",
           "PickleCheckpointError", "export_hf", "hf_config", "import_hf", "load_hf_config", "load_hf_model",
           "save_tokenizer"]
