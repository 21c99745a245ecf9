"""glora_jax: GLoRA and SURM parameter-efficient fine-tuning in JAX/Flax."""

__version__ = '0.1.0'
