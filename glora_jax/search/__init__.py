"""Subnet encoding and evolutionary search over integer-encoded subnets."""
from glora_jax.search.subnet import (count_params, dumps, from_dict, largest, loads, sample,
                                     to_dict)
