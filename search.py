"""Evolutionary search over a trained GLoRA supernet, then merge and export.

  python search.py --ckpt runs/bbc --param_limit 0.1

Prints the chosen subnet, its adapter parameters, validation and test accuracy (the
task's headline metric: for a causal LM the mean log-likelihood of the response tokens;
or --fitness, e.g. multiple-choice accuracy on --mc_file); writes best_subnet.json,
pareto.json, search.png and the merged plain params under --out (default: <ckpt>/search), in the
--export_formats: 'flax' (merged_params/ and merged_params.safetensors with
model_config.json, the plain model to load them into: glora_jax.search.export.load_merged)
and 'torch' (the model's PyTorch layout: hf/ for BERT and LLaMA, which
transformers.AutoModel.from_pretrained reads, timm/ for ViT). Rerunning the same
command after an interruption continues from the last finished generation.
"""

from absl import flags

from glora_jax import cli
from glora_jax.search.evolution import SearchConfig

flags.DEFINE_string('ckpt', None, 'A train.py workdir holding a GLoRA supernet checkpoint.')
flags.DEFINE_string('out', '', 'Output directory (default: <ckpt>/search).')
# One flag per SearchConfig field, with its default (the dataclass is the one source):
# here only each flag's help, and the parameter limits' unit (millions on the command line).
SEARCH_HELP = {
    'population': 'Candidates in the first generation (and per generation with refill=population).',
    'generations': 'Rounds of evolution after the random first population.',
    'parents': 'Top candidates kept as parents.',
    'mutations': 'Children by mutation per generation.',
    'crossovers': 'Children by crossover per generation.',
    'mutation_prob': 'Probability to redraw each choice in a mutation.',
    'tries': 'Attempts per wanted child before random fill.',
    'param_limit': 'Most adapter parameters, in millions.',
    'min_param_limit': 'Fewest adapter parameters, in millions.',
    'seed': 'Search seed.',
    'refill': "'population': top every generation up to --population with random candidates "
              "(the authors); 'children': only up to mutations + crossovers.",
    'random_fill': "'mixed': half the random candidates uniform, half thinned towards cheap "
                   "layers; 'uniform': the authors' sampler alone.",
    'race': 'Racing: the share of the eval split in the first heat, after which only the '
            'better half is scored on the rest (0: off, every candidate on the whole split).',
    'tie_break': "Candidates of equal val accuracy: 'params' ranks fewer adapter parameters "
                 "first; 'loss' lower mean val loss first, then fewer parameters.",
    'rank_by': "What makes a candidate better (parents, racing, Pareto front, the chosen "
               "subnet): 'accuracy' (the authors) higher val accuracy, then --tie_break; "
               "'loss' lower mean val loss, then higher accuracy, then fewer parameters.",
    'start': "First population: 'random' (the authors); 'anchor' begins it with the subnet "
             "the supernet trained every step (its supernet.anchor, else the largest) when "
             "that meets the budget.",
}
SEARCH_UNITS = {'param_limit': 1e6, 'min_param_limit': 1e6}
SEARCH_FLAGS = cli.define_dataclass_flags(SearchConfig, SEARCH_HELP, SEARCH_UNITS)
flags.DEFINE_integer('chunk', 0, 'Candidates evaluated together in one vmapped call; 0 measures '
                     'the fastest (1 or 8 times the data-parallel size) at start-up.')
flags.DEFINE_integer('eval_batch_size', 32, 'Examples per evaluation batch.')
flags.DEFINE_integer('retrain_epochs', 0, 'Retrain the chosen subnet (choices fixed) before merging.')
flags.DEFINE_string('fitness', '', "What the search ranks by ('' = the task's headline metric): "
                    "another of its metrics, e.g. f1; for a causal LM token_log_likelihood (the "
                    "default: minus the mean val response loss), next_token_accuracy, or mc_acc / "
                    "mc_acc_norm on --mc_file (lm-eval-harness's multiple-choice accuracy).")
flags.DEFINE_string('mc_file', '', 'Multiple-choice JSON lines {"context", "choices", "gold"} '
                    'for --fitness mc_acc or mc_acc_norm.')
flags.DEFINE_list('export_formats', ['flax', 'torch'],
                  "Merged exports to write: 'flax' (merged_params, model_config.json) and/or "
                  "'torch' (HF transformers layout in <out>/hf, timm's in <out>/timm).")
flags.DEFINE_string('requantize', '', "'int8' or 'nf4': also score the merged kernels quantized "
                    'again (blocks as the run\'s model.frozen_quant_block) and report the error it '
                    "adds in summary.json's 'requantized' (the exports stay float).")
flags.mark_flag_as_required('ckpt')
FLAGS = flags.FLAGS


def work():
  from glora_jax.search import driver
  cfg = cli.dataclass_from_flags(SearchConfig, SEARCH_FLAGS, SEARCH_UNITS)
  s = driver.search_and_export(FLAGS.ckpt, cfg, out=FLAGS.out or None, chunk=FLAGS.chunk or None,
                               eval_batch_size=FLAGS.eval_batch_size,
                               retrain_epochs=FLAGS.retrain_epochs,
                               export_formats=FLAGS.export_formats, fitness=FLAGS.fitness,
                               mc_file=FLAGS.mc_file, requantize=FLAGS.requantize)
  print(open(s['subnet_file']).read())
  metric = s['val_metric']  # what was ranked by: accuracy, f1, pearson, token_log_likelihood, ...
  # The test split reports the task's own metrics (a multiple-choice fitness has none there).
  tested = metric if f'test_{metric}' in s else next(
      k[len('test_'):] for k in s if k.startswith('test_') and k != 'test_loss')
  print(f"chosen subnet: {s['adapter_params']:,} adapter params (+{s['head_params']:,} head), "
        f"val {metric.replace('_', ' ')} {s[f'val_{metric}']:.4f}, test "
        f"{tested.replace('_', ' ')} {s[f'test_{tested}']:.4f} "
        f"(merged: {s[f'test_{tested}_merged']:.4f}, predictions agree on "
        f"{100 * s['merged_prediction_agreement']:.1f}%)")
  if 'requantized' in s:
    r = s['requantized']
    print(f"re-quantized merge ({r['kind']}): test {tested.replace('_', ' ')} "
          f"{r[f'test_{tested}']:.4f}, predictions agree with the adapted model on "
          f"{100 * r['prediction_agreement']:.1f}%, weight error {r['relative_weight_error']:.2e} "
          '(relative)')
  print('merged params: ' + ', '.join(s['exports'].values()))


if __name__ == '__main__':
  cli.main(work)
