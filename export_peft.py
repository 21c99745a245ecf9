"""Write a trained LoRA run (train.py --config configs/bbc_minilm_lora.py) as PEFT files.

  python export_peft.py --ckpt runs/lora                  # -> runs/lora/peft

Writes adapter_config.json and adapter_model.safetensors under --out (default:
<ckpt>/peft): the LoRA factors under PEFT's names (base_model.model.<torch module>.
lora_A.weight, (r, in); lora_B.weight, (out, r)) and the trained head as PEFT's
modules_to_save ('head'), which `peft.PeftModel.from_pretrained(base, out)` reads.
"""

from absl import app, flags

flags.DEFINE_string('ckpt', None, 'A train.py workdir of a LoRA run (method lora).')
flags.DEFINE_string('out', '', 'Output directory (default: <ckpt>/peft).')
flags.DEFINE_string('base_model', '', 'base_model_name_or_path to record (default: the '
                    "pretrained model's directory, e.g. the bundled MiniLM).")
flags.mark_flag_as_required('ckpt')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from glora_jax.cli import run_guarded
  from glora_jax.interop import peft_lora

  def work():
    files = peft_lora.save_trained_run(FLAGS.ckpt, FLAGS.out or None,
                                       base_model_name_or_path=FLAGS.base_model or None)
    print('PEFT files: ' + ', '.join(files.values()))

  return run_guarded(work)


if __name__ == '__main__':
  from glora_jax.cli import parse_flags
  app.run(main, flags_parser=parse_flags)
