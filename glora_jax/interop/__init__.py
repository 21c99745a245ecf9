"""The PyTorch world's files: merged params in HF transformers / timm layouts
(`save_pretrained`, `load_pretrained`) and LoRA adapters as PEFT files
(`save_peft_adapter`, `load_peft_adapter`), each through the importers' rule tables."""
from glora_jax.interop.layouts import Layout, layout
from glora_jax.interop.peft_lora import load_peft_adapter, read_peft_config, save_peft_adapter
from glora_jax.interop.pretrained import (from_state_dict, load_pretrained, save_pretrained,
                                          to_state_dict)

__all__ = ['Layout', 'layout', 'save_pretrained', 'load_pretrained', 'to_state_dict',
           'from_state_dict', 'save_peft_adapter', 'load_peft_adapter', 'read_peft_config']
