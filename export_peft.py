"""Write a trained LoRA run (train.py --config configs/bbc_minilm_lora.py) as PEFT files.

  python export_peft.py --ckpt runs/lora                  # -> runs/lora/peft

Writes adapter_config.json and adapter_model.safetensors under --out (default:
<ckpt>/peft): the LoRA factors under PEFT's names (base_model.model.<torch module>.
lora_A.weight, (r, in); lora_B.weight, (out, r)) and the trained head as PEFT's
modules_to_save ('head'), which `peft.PeftModel.from_pretrained(base, out)` reads.
"""

from absl import flags

from glora_jax import cli

flags.DEFINE_string('ckpt', None, 'A train.py workdir of a LoRA run (method lora).')
flags.DEFINE_string('out', '', 'Output directory (default: <ckpt>/peft).')
flags.DEFINE_string('base_model', '', 'base_model_name_or_path to record (default: the '
                    "pretrained model's directory, e.g. the bundled MiniLM).")
flags.mark_flag_as_required('ckpt')
FLAGS = flags.FLAGS


def work():
  from glora_jax.interop import peft_lora
  files = peft_lora.save_trained_run(FLAGS.ckpt, FLAGS.out or None,
                                     base_model_name_or_path=FLAGS.base_model or None)
  print('PEFT files: ' + ', '.join(files.values()))


if __name__ == '__main__':
  cli.main(work)
