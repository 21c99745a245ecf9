#!/usr/bin/env bash
# The main job on a machine with only Python 3: makes .venv (or $VENV) if absent, installs,
# then trains the GLoRA supernet on the bundled all-MiniLM-L6-v2 and BBC News and searches
# it (prints the chosen subnet and the merged model's test accuracy; writes runs/bbc/search,
# with the merged model for PyTorch in runs/bbc/search/hf).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
python train.py --config configs/bbc_minilm_glora.py:quick --workdir runs/bbc
python search.py --ckpt runs/bbc --population 10 --generations 3 --parents 5 --mutations 5 --crossovers 5 --param_limit 0.33
