"""Backbones as linen modules over plain {'params': ...} dicts, unaware of adapters:
bert, vit, llama (each with importers and partition_rules), importers, partitioning."""
from glora_jax.models import bert, importers, llama, partitioning, vit
