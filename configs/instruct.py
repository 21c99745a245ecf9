"""Instruction tuning of a decoder checkpoint (Llama 1-3.x, Qwen2, Mistral) on Alpaca or chat
JSON lines, the GLoRA paper's LLaMA setting: the loss on responses, packed rows.

  python train.py --config configs/instruct.py:method=glora,format=alpaca \
      --config.model.checkpoint=/path/Llama-3.2-1B --config.data.train_split=alpaca_data.json
  python train.py --config configs/instruct.py:format=chat \
      --config.model.checkpoint=/path/Qwen2.5-0.5B-Instruct --config.data.train_split=sharegpt.jsonl
  python search.py --ckpt <workdir>    # fitness: mean log-likelihood of the val responses
  python generate.py --model <workdir>/search/hf --chat --prompt "..."

format 'alpaca': records {instruction, input, output} with Stanford Alpaca's prompt, the
loss on the output and eos; 'chat': {messages: [{role, content}]} or ShareGPT's
{conversations: [{from, value}]} through the checkpoint's own chat template, the loss on
the assistant turns. Recipe after tloen/alpaca-lora (3 epochs, lr 3e-4, a held-out share
of the train file for validation) with packing on and data.max_len 512 (alpaca-lora cuts
at 256 and pads); adapters on every attention and MLP projection (llama.DEFAULT_TARGETS).
`tiny` shortens everything for tests.
"""
from configs.common import base_config, parse_arg


def get_config(arg: str | None = None):
  arg = parse_arg(arg, __file__, method=('glora', 'lora', 'surm'), format=('alpaca', 'chat'),
                  tiny=False)
  c = base_config()
  c.task = 'causal_lm'
  c.method = arg.method
  c.model.name = 'llama'  # model.checkpoint's config.json names the family
  c.model.checkpoint = ''
  c.model.loss_chunk = 256  # large vocabularies (Llama 3: 128,256) never hold all logits
  c.model.scan_layers = True  # compile time flat in depth (BENCHMARKS.md, Scale)
  c.data.name = 'json'
  c.data.format = arg.format
  c.data.train_split, c.data.eval_split, c.data.test_split = '', '', ''
  c.data.val_fraction, c.data.val_seed = 0.02, 0
  c.data.packing = True
  c.data.max_len = 512
  c.num_epochs, c.optim.lr = 3, 3e-4
  c.optim.weight_decay = 0.0
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = 0
  c.batch_size = c.eval_batch_size = 16
  c.log_every_steps = 20
  if arg.tiny:
    c.data.max_len, c.batch_size, c.eval_batch_size = 256, 8, 8
    c.num_epochs, c.optim.lr, c.log_every_steps, c.model.loss_chunk = 1, 1e-3, 1, 64
  return c
