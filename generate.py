"""Generate text with a decoder: a HF checkpoint, a search.py output directory (its merged
model) or a train.py workdir (the frozen base with its trained adapters).

  python generate.py --model tests/fixtures/hf_llama3 --prompt "Once upon a time"
  python generate.py --model runs/llama --prompts prompts.jsonl --json --temperature 0.7 --top_p 0.9
  python generate.py --model runs/llama --subnet runs/llama/search/best_subnet.json --chat \
    --prompt "What is GLoRA?"

--prompts: one prompt per line, or JSON lines with a "prompt" field. --json prints one line
per prompt: {"prompt", "ids" (prompt ids + new ids), "new_ids", "text"}; without it, each
generated text. Bad input is one 'error:' line on stderr and exit code 2.
"""

import contextlib
import json
import sys

from absl import flags

from glora_jax import cli, errors

flags.DEFINE_string('model', None, 'A HF decoder checkpoint directory, a search.py output '
                    'directory or a train.py workdir.')
flags.DEFINE_string('prompt', None, 'One prompt.')
flags.DEFINE_string('prompts', None,
                    'A file of prompts: one per line, or JSON lines with a "prompt" field.')
flags.DEFINE_integer('max_new_tokens', 128, 'Most tokens generated per prompt.')
flags.DEFINE_float('temperature', 0.0, 'Sampling temperature; 0 is greedy.')
flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling: keep the fewest top tokens with this much '
                   'probability (1: all).')
flags.DEFINE_integer('top_k', 0, 'Keep the k most likely tokens before top_p (0: all).')
flags.DEFINE_integer('seed', 0, 'Sampling seed.')
flags.DEFINE_multi_string('stop', [], 'A stop string (repeatable): the text is cut before it.')
flags.DEFINE_bool('chat', False, "Render each prompt as a user message in the checkpoint's chat "
                  'template.')
flags.DEFINE_bool('json', False, 'One JSON line per prompt instead of the text.')
flags.DEFINE_string('subnet', None, "For a GLoRA supernet's workdir: the subnet JSON to run "
                    '(default: the largest).')
flags.DEFINE_integer('batch_size', 8, 'Prompts generated together.')
flags.mark_flag_as_required('model')
FLAGS = flags.FLAGS


def work():
  from glora_jax import generate
  if (FLAGS.prompt is None) == (FLAGS.prompts is None):
    raise errors.ConfigError('give exactly one of --prompt TEXT and --prompts FILE')
  if FLAGS.batch_size < 1:
    raise errors.ConfigError(f'--batch_size is {FLAGS.batch_size}; expected at least 1')
  prompts = [FLAGS.prompt] if FLAGS.prompts is None else generate.read_prompts(FLAGS.prompts)
  # A workdir's run rebuilds its data and reports it: stdout carries only the generations.
  with contextlib.redirect_stdout(sys.stderr):
    generator = generate.load(FLAGS.model, subnet_file=FLAGS.subnet)
  try:
    completions = generator(prompts, max_new_tokens=FLAGS.max_new_tokens,
                            temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k,
                            seed=FLAGS.seed, stop=FLAGS.stop, chat=FLAGS.chat,
                            batch_size=FLAGS.batch_size)
  except ValueError as e:  # a sampling setting out of range, a prompt longer than the model
    raise errors.ConfigError(str(e)) from None
  for c in completions:
    if FLAGS.json:
      print(json.dumps({'prompt': c.prompt, 'ids': c.prompt_ids + c.new_ids,
                        'new_ids': c.new_ids, 'text': c.text}, ensure_ascii=False), flush=True)
    else:
      print(c.text, flush=True)


if __name__ == '__main__':
  cli.main(work)
