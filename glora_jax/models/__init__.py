"""Backbones as linen modules over plain {'params': ...} dicts, unaware of adapters:
registry (the model families by name), bert (BERT, RoBERTa), llama (Llama, Qwen2,
Mistral), vit, plain (the plain model that reads merged params), importers, common
(remat, attention), stacking (layers stacked for scan_layers)."""
from glora_jax.models import bert, common, importers, llama, plain, registry, stacking, vit
