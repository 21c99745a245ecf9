"""Adapter families: pure functions over one layer's parameters (see base.py)."""
from glora_jax.adapters.base import AdapterFamily
from glora_jax.adapters import glora, lora
from glora_jax.adapters import surm
