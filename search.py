"""Evolutionary search over a trained GLoRA supernet, then merge and export.

  python search.py --ckpt runs/bbc --param_limit 0.1

Prints the chosen subnet, its adapter parameters, validation and test accuracy
(next-token accuracy for a causal LM); writes best_subnet.json, pareto.json,
search.png and the merged plain params under --out (default: <ckpt>/search), in the
--export_formats: 'flax' (merged_params/ and merged_params.safetensors with
model_config.json, the plain model to load them into: glora_jax.search.export.load_merged)
and 'torch' (the model's PyTorch layout: hf/ for BERT and LLaMA, which
transformers.AutoModel.from_pretrained reads, timm/ for ViT). Rerunning the same
command after an interruption continues from the last finished generation.
"""

from absl import app, flags

flags.DEFINE_string('ckpt', None, 'A train.py workdir holding a GLoRA supernet checkpoint.')
flags.DEFINE_string('out', '', 'Output directory (default: <ckpt>/search).')
flags.DEFINE_integer('population', 50, 'Candidates in the first generation.')
flags.DEFINE_integer('generations', 20, 'Generations.')
flags.DEFINE_integer('parents', 10, 'Top candidates kept as parents.')
flags.DEFINE_integer('mutations', 25, 'Children by mutation per generation.')
flags.DEFINE_integer('crossovers', 25, 'Children by crossover per generation.')
flags.DEFINE_float('mutation_prob', 0.2, 'Probability to redraw each choice in a mutation.')
flags.DEFINE_integer('tries', 10, 'Attempts per wanted child before random fill.')
flags.DEFINE_float('param_limit', 1.0, 'Most adapter parameters, in millions.')
flags.DEFINE_float('min_param_limit', 0.0, 'Fewest adapter parameters, in millions.')
flags.DEFINE_integer('seed', 0, 'Search seed.')
flags.DEFINE_integer('chunk', 8, 'Candidates evaluated together in one vmapped call.')
flags.DEFINE_integer('eval_batch_size', 32, 'Examples per evaluation batch.')
flags.DEFINE_integer('retrain_epochs', 0, 'Retrain the chosen subnet (choices fixed) before merging.')
flags.DEFINE_list('export_formats', ['flax', 'torch'],
                  "Merged exports to write: 'flax' (merged_params, model_config.json) and/or "
                  "'torch' (HF transformers layout in <out>/hf, timm's in <out>/timm).")
flags.mark_flag_as_required('ckpt')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from glora_jax.cli import run_guarded
  from glora_jax.search import driver, evolution

  def work():
    try:
      cfg = evolution.SearchConfig(
          population=FLAGS.population, generations=FLAGS.generations, parents=FLAGS.parents,
          mutations=FLAGS.mutations, crossovers=FLAGS.crossovers, mutation_prob=FLAGS.mutation_prob,
          tries=FLAGS.tries, param_limit=FLAGS.param_limit * 1e6,
          min_param_limit=FLAGS.min_param_limit * 1e6, seed=FLAGS.seed)
    except ValueError as e:
      from glora_jax.errors import ConfigError
      raise ConfigError(str(e)) from None
    s = driver.search_and_export(FLAGS.ckpt, cfg, out=FLAGS.out or None, chunk=FLAGS.chunk,
                                 eval_batch_size=FLAGS.eval_batch_size,
                                 retrain_epochs=FLAGS.retrain_epochs,
                                 export_formats=FLAGS.export_formats)
    print(open(s['subnet_file']).read())
    metric = s['val_metric']  # accuracy, or next_token_accuracy for a causal LM
    name = metric.replace('_', ' ')
    print(f"chosen subnet: {s['adapter_params']:,} adapter params (+{s['head_params']:,} head), "
          f"val {name} {s[f'val_{metric}']:.4f}, test {name} {s[f'test_{metric}']:.4f} "
          f"(merged: {s[f'test_{metric}_merged']:.4f}, predictions agree on "
          f"{100 * s['merged_prediction_agreement']:.1f}%)")
    print('merged params: ' + ', '.join(s['exports'].values()))

  return run_guarded(work)


if __name__ == '__main__':
  from glora_jax.cli import parse_flags
  app.run(main, flags_parser=parse_flags)
