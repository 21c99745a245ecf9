"""GLoRA on a decoder (Llama 1-3.x, Qwen2, Mistral) with the causal-LM loss. With
--config.model.checkpoint=<dir> (a directory transformers' save_pretrained wrote:
config.json, safetensors, tokenizer.json; its config.json names the family) the text is
tokenised by its own tokenizer; without one a small random Llama trains on the bundled
BBC News texts with MiniLM's tokenizer. `:tiny` shrinks it for tests."""
from configs.common import base_config, parse_arg


def get_config(arg: str | None = None):
  c = base_config()
  c.task = 'causal_lm'
  c.method = 'glora'
  c.model.name = 'llama'
  c.model.checkpoint = ''
  c.model.scan_layers = True  # compile time flat in depth (BENCHMARKS.md, Scale)
  c.model.hidden = 256
  c.model.intermediate = 688
  c.model.layers = 4
  c.model.heads = 4
  c.model.kv_heads = 2
  c.data.max_len = 128
  c.optim.lr = 1e-3
  c.num_epochs = 1
  if parse_arg(arg, __file__, tiny=False).tiny:
    c.model.hidden, c.model.intermediate, c.model.layers = 64, 128, 2
    c.data.max_len, c.data.limit, c.batch_size, c.eval_batch_size = 32, 32, 16, 16
    c.log_every_steps = 1
  return c
