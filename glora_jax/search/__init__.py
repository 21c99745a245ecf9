"""Evolutionary search over integer-encoded subnets (glora_jax/subnet.py): evolution,
vmapped fitness, merge and export, and the driver that search.py runs."""
