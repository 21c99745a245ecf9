"""Experiment configs (ml_collections): each file's get_config(arg) overrides what
differs from configs.common.base_config. A package in pyproject.toml, so `from configs
import ...` and the config files' own `from configs.common import ...` work from any
directory once glora_jax is installed (scripts/install.sh: editable)."""
