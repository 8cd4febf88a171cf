"""minilora: LoRA for PyTorch models, small to read and interchangeable with peft.

    import minilora
    minilora.inject(model, targets=["q_proj", "v_proj"], r=16, lora_alpha=32)
"""

from minilora.adapters import add_weighted_adapter, delete_adapter, per_sample_adapters, set_adapter
from minilora.auto import from_pretrained
from minilora.checkpoint import AdapterFileError, adapter_state_dict, load_adapter, save_adapter
from minilora.config import LoraConfig
from minilora.hotswap import hotswap_adapter, prepare_for_hotswap
from minilora.inject import (adapted_modules, find_targets, inject, print_trainable_parameters,
                             trainable_parameters, unload)
from minilora.layers import LoraLayer
from minilora.merge import disable_adapters, merge, merge_and_unload, unmerge
from minilora.modules_to_save import ModulesToSave
from minilora.ops import lora_linear, lora_linear_reference
from minilora.training import prepare_model_for_kbit_training, require_input_grads, save_adapter_sharded

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "inject", "find_targets", "adapted_modules", "trainable_parameters", "print_trainable_parameters",
    "merge", "unmerge", "merge_and_unload", "unload", "disable_adapters",
    "set_adapter", "delete_adapter", "add_weighted_adapter", "per_sample_adapters",
    "save_adapter", "load_adapter", "adapter_state_dict", "AdapterFileError",
    "prepare_for_hotswap", "hotswap_adapter", "from_pretrained",
    "save_adapter_sharded", "require_input_grads", "prepare_model_for_kbit_training",
    "LoraLayer", "ModulesToSave", "lora_linear", "lora_linear_reference",
]
