"""Writes tests/fixtures/: PyTorch reference outputs (and tiny random checkpoints) for the model tests.

CI does not run this; the fixtures it wrote are committed. To regenerate them:

    . .venv/bin/activate
    pip install torch transformers sentence-transformers torchvision==0.29.1 timm
    python scripts/make_torch_fixtures.py            # writes tests/fixtures/, about 0.5 MB

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
"""
from __future__ import annotations

import pathlib
import shutil

import numpy as np
import torch

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


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
  """Random values for every parameter, LayerNorm scales and biases included, so
  that a mapping mistake (transposed, swapped, skipped leaf) changes the output."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * scale
      p.copy_(1.0 + noise if name.endswith(('norm1.weight', 'norm2.weight', 'norm.weight',
                                              'layernorm.weight')) else noise * 3)


def make_minilm() -> None:
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


def main() -> None:
  OUT.mkdir(parents=True, exist_ok=True)
  make_minilm()
  make_vit()
  make_llama()
  total = sum(p.stat().st_size for p in OUT.rglob('*') if p.is_file())
  print(f'wrote {OUT} ({total / 1e6:.2f} MB):')
  for p in sorted(OUT.rglob('*')):
    if p.is_file():
      print(f'  {p.relative_to(OUT)}  {p.stat().st_size:,} bytes')


if __name__ == '__main__':
  main()
