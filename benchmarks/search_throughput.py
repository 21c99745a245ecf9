"""Search evaluation throughput: candidates per second, a vmapped chunk of 8 vs one
candidate at a time, on MiniLM with GLoRA on all 36 linear layers, in one run.

  python benchmarks/search_throughput.py [--candidates 16] [--batch 32] [--tokens 128]
"""
import argparse
import sys

sys.path.insert(0, 'benchmarks')
from speed import minilm_setup, section_search  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--candidates', type=int, default=16)
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--tokens', type=int, default=128)
  args = ap.parse_args()
  model, params, batch, task = minilm_setup(args.batch, args.tokens)
  section_search(model, params, batch, task, args.candidates)


if __name__ == '__main__':
  main()
