"""Backbones as linen modules over plain {'params': ...} dicts, unaware of adapters:
bert, vit, llama (each with importers and partition_rules), importers, common (remat, attention)."""
from glora_jax.models import bert, common, importers, llama, vit
