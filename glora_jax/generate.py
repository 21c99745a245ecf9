"""Text generation with a decoder and, optionally, its adapters under a subnet: one jitted
prefill and one jitted decode loop over an explicit KV cache, greedy or sampled.

    out = generate(model, params, ids, mask, max_new_tokens=32, eos_ids=(1,), pad_id=2)
    completions = load('runs/llama')(['Once upon a time'], max_new_tokens=32)  # text in and out

Prompts are left-padded (position_ids = cumsum(mask) - 1, as transformers' generate).
What compiles anew: another model or adapter structure, prompt batch shape,
max_new_tokens, or greedy versus sampling; new prompts of the same padded shape, a new
subnet, seed, temperature, top_k or top_p reuse the compiled programs.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from glora_jax import errors, peft
from glora_jax.data import text
from glora_jax.models import registry

# Prompt batches are left-padded to a multiple of this many tokens, so prompts of nearby
# lengths share one compiled prefill and decode loop.
PAD_MULTIPLE = 16
GENERATION_CONFIG = 'generation_config.json'


class Generated(NamedTuple):
  """What `generate` returns. ids: (batch, max_new_tokens) int32, the new tokens, pad_id
  after a row's eos; lengths: (batch,) new tokens per row, its eos included; logits:
  (batch, max_new_tokens, vocab) float32 raw logits each new token was chosen from
  (return_logits; None otherwise; zero past the step where every row had finished)."""
  ids: jax.Array
  lengths: jax.Array
  logits: jax.Array | None


# --------------------------------------------------------------------------- #
# Choosing a token
# --------------------------------------------------------------------------- #


def filter_logits(logits, top_k=0, top_p=1.0):
  """Logits with what top-k, then top-p (nucleus) sampling drops set to -inf, as
  transformers' TopKLogitsWarper then TopPLogitsWarper: top_k keeps the k largest (ties
  with the k-th too; 0: all); top_p keeps the smallest set of the largest whose
  probabilities sum to at least top_p, always the largest one (1: all). Both may be
  traced: one program serves every value."""
  vocab = logits.shape[-1]
  ranked = jnp.flip(jnp.sort(logits, axis=-1), -1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(ranked, jnp.broadcast_to(k - 1, ranked.shape[:-1] + (1,)), -1)
  ranked = jnp.where(ranked >= kth, ranked, -jnp.inf)
  probs = jax.nn.softmax(ranked, axis=-1)
  above = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked higher
  # top_p 1 keeps everything: a float32 cumsum can reach 1 before the last tokens.
  keep = (above < top_p) | (jnp.arange(vocab) == 0) | (top_p >= 1.0)
  threshold = jnp.maximum(jnp.min(jnp.where(keep, ranked, jnp.inf), -1, keepdims=True), kth)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample(key, logits, temperature, top_k=0, top_p=1.0):
  """One token per row drawn from softmax(logits / temperature) after `filter_logits`
  (temperature > 0)."""
  return jax.random.categorical(key, filter_logits(logits / temperature, top_k, top_p), axis=-1)


# --------------------------------------------------------------------------- #
# The two compiled programs
# --------------------------------------------------------------------------- #


def _forward(model, params, adapters, subnet, *args, **kwargs):
  if adapters is None:
    return model.apply({'params': peft.unwrap(params)[0]}, *args, **kwargs)
  return peft.forward(model, params, adapters, subnet, *args, **kwargs)


def _init_cache(model):
  family = registry.of_model(model)
  if family.init_cache is None:
    decoders = sorted(f.name for f in registry.FAMILIES.values() if f.init_cache is not None)
    raise ValueError(f"model family '{family.name}' ({family.task}) cannot generate: it has no "
                     f'KV cache; expected a decoder family, one of {decoders}')
  return family.init_cache


@functools.partial(jax.jit, static_argnames=('model', 'max_len'))
def prefill(model, params, adapters, subnet, prompt_ids, prompt_mask, *, max_len: int):
  """(last position's logits (batch, vocab), the cache of max_len slots holding the
  prompt): every prompt token in one call. Rows are left-padded (prompt_mask 0 first)."""
  cache = _init_cache(model)(model.config, prompt_ids.shape[0], max_len)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, -1, dtype=jnp.int32) - 1, 0)
  logits, cache = _forward(model, params, adapters, subnet, prompt_ids, prompt_mask, positions,
                           cache=cache, last_only=True)
  return logits[:, -1], cache


class _Loop(NamedTuple):
  step: jax.Array  # the next new token's index
  token: jax.Array  # (batch,) the last token chosen
  done: jax.Array  # (batch,) bool: the row has emitted an eos
  cache: Any
  ids: jax.Array
  lengths: jax.Array
  logits: jax.Array | None


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'greedy', 'return_logits'),
                   donate_argnames=('cache',))
def decode(model, params, adapters, subnet, first_logits, cache, rng, temperature, top_k, top_p,
           eos_ids, pad_id, *, max_new_tokens: int, greedy: bool,
           return_logits: bool) -> tuple[Generated, Any]:
  """(Generated, the final cache): the decode loop after `prefill`, a token chosen from
  each step's logits and fed back one per step through the cache, until max_new_tokens
  or every row has emitted one of eos_ids. A finished row is fed pad_id from then on (as
  transformers does, so its later logits match). The cache is donated and returned, so
  the loop updates it in place; everything but the static arguments is traced."""
  batch = first_logits.shape[0]

  def choose(logits, step):
    if greedy:
      return jnp.argmax(logits, -1).astype(jnp.int32)
    key = jax.random.fold_in(rng, step)
    return sample(key, logits, temperature, top_k, top_p).astype(jnp.int32)

  def emit(state: _Loop, logits) -> _Loop:
    token = jnp.where(state.done, pad_id, choose(logits, state.step))
    kept = state.logits
    if return_logits:
      kept = kept.at[:, state.step].set(logits)
    return _Loop(step=state.step + 1, token=token,
                 done=state.done | jnp.any(token[:, None] == eos_ids[None, :], -1),
                 cache=state.cache, ids=state.ids.at[:, state.step].set(token),
                 lengths=state.lengths + (~state.done).astype(jnp.int32), logits=kept)

  def step(state: _Loop) -> _Loop:
    logits, cache = _forward(model, params, adapters, subnet, state.token[:, None],
                             cache=state.cache, last_only=True)
    return emit(state._replace(cache=cache), logits[:, -1])

  start = _Loop(step=jnp.zeros((), jnp.int32), token=jnp.zeros((batch,), jnp.int32),
                done=jnp.zeros((batch,), bool), cache=cache,
                ids=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
                lengths=jnp.zeros((batch,), jnp.int32),
                logits=(jnp.zeros((batch, max_new_tokens, first_logits.shape[-1]), jnp.float32)
                        if return_logits else None))
  end = jax.lax.while_loop(lambda s: (s.step < max_new_tokens) & ~jnp.all(s.done), step,
                           emit(start, first_logits))
  return Generated(end.ids, end.lengths, end.logits), end.cache


# --------------------------------------------------------------------------- #
# Ids in, ids out
# --------------------------------------------------------------------------- #


def check_positions(model, prompt_len: int, max_new_tokens: int) -> None:
  """A prompt of prompt_len real tokens and max_new_tokens after it fit the positions the
  model was trained for (its max_position_embeddings, where the family has one)."""
  positions = getattr(model.config, 'max_position_embeddings', None)
  if positions is not None and prompt_len + max_new_tokens > positions:
    raise ValueError(f'max_new_tokens {max_new_tokens} after a prompt of {prompt_len} tokens '
                     f'needs {prompt_len + max_new_tokens} positions; the model has {positions} '
                     f'(max_position_embeddings): expected max_new_tokens <= '
                     f'{positions - prompt_len}')


def _check_prompts(model, prompt_ids, prompt_mask, max_new_tokens: int) -> None:
  if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
    raise ValueError(f'prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape}: '
                     'expected both (batch, prompt length)')
  real = prompt_mask.sum(-1)
  if (real == 0).any():
    raise ValueError(f'prompt row {int(np.argmin(real))} has no real token (prompt_mask all 0); '
                     'expected at least one')
  # Left padding: each row's mask is 0s then 1s, so every row's newest token is last.
  unpadded = (np.diff(prompt_mask.astype(np.int8), axis=-1) < 0).any(-1)
  if unpadded.any():
    row = int(np.argmax(unpadded))
    raise ValueError(f'prompt row {row} is not left-padded (its mask is '
                     f'{prompt_mask[row].tolist()}); expected padding (0) before the real '
                     'tokens (1)')
  check_positions(model, int(real.max()), max_new_tokens)


def generate(model, params, prompt_ids, prompt_mask=None, *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             eos_ids: Sequence[int] = (), pad_id: int = 0, rng=None, adapters=None, subnet=None,
             return_logits: bool = False) -> Generated:
  """New tokens for left-padded prompts (batch, length) with a decoder (its family has a
  KV cache): `prefill`, then `decode`. temperature 0 is greedy (top_k, top_p unused);
  otherwise softmax(logits / temperature) after top-k then top-p (`filter_logits`), drawn
  with `rng` (a jax key; default key 0) folded with the step. A row stops after one of
  eos_ids (kept in its ids), then holds pad_id. With `adapters` the model runs with them
  (peft.forward) under `subnet` (an int array, traced: any subnet reuses the programs).
  prompt_mask defaults to all real; its values must be concrete (checked here)."""
  _init_cache(model)  # a family that cannot generate fails here, before anything compiles
  prompt_ids = np.asarray(prompt_ids, np.int32)
  prompt_mask = (np.ones_like(prompt_ids) if prompt_mask is None
                 else np.asarray(prompt_mask).astype(np.int32))
  if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1):
    raise ValueError(f'max_new_tokens is {max_new_tokens!r}; expected an int >= 1')
  if not temperature >= 0:
    raise ValueError(f'temperature is {temperature}; expected >= 0 (0: greedy)')
  if not 0 <= top_p <= 1:
    raise ValueError(f'top_p is {top_p}; expected 0 <= top_p <= 1 (1: no nucleus filter)')
  if not (isinstance(top_k, (int, np.integer)) and top_k >= 0):
    raise ValueError(f'top_k is {top_k!r}; expected an int >= 0 (0: no top-k filter)')
  _check_prompts(model, prompt_ids, prompt_mask, max_new_tokens)
  if adapters is not None:
    subnet = peft.check_subnet(adapters.spec, subnet)
  first, cache = prefill(model, params, adapters, subnet, prompt_ids, prompt_mask,
                         max_len=prompt_ids.shape[1] + max_new_tokens)
  generated, _ = decode(model, params, adapters, subnet, first, cache,
                         jax.random.key(0) if rng is None else rng, jnp.float32(temperature),
                         jnp.int32(top_k), jnp.float32(top_p),
                         jnp.asarray(eos_ids, jnp.int32).reshape(-1), jnp.int32(pad_id),
                         max_new_tokens=int(max_new_tokens), greedy=temperature == 0,
                         return_logits=return_logits)
  return generated


# --------------------------------------------------------------------------- #
# Text in, text out
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Completion:
  """One prompt's generation. prompt_ids: what the model read (the tokenizer's special
  tokens, or the chat template, included); new_ids: the generated tokens, an eos
  included, up to the token that completed a stop string; text: new_ids decoded without
  special tokens, cut before the first stop string."""
  prompt: str
  prompt_ids: list[int]
  new_ids: list[int]
  text: str


def _generation_config(directory: pathlib.Path) -> dict:
  path = directory / GENERATION_CONFIG
  return json.loads(path.read_text()) if path.is_file() else {}


def _as_ids(value) -> list[int]:
  return [] if value is None else [int(v) for v in (value if isinstance(value, list) else [value])]


def stop_token_ids(tokenizer: tokenizers.Tokenizer, tokenizer_path) -> tuple[int, ...]:
  """The eos ids: tokenizer_config.json's eos_token, and generation_config.json's
  eos_token_id (an int or a list) beside it, as transformers' generate stops on both."""
  token = text.config_token(tokenizer_path, 'eos_token')
  ids = [tokenizer.token_to_id(token)] if token and tokenizer.token_to_id(token) is not None else []
  ids += _as_ids(_generation_config(pathlib.Path(tokenizer_path).parent).get('eos_token_id'))
  return tuple(dict.fromkeys(ids))


def _pad_id(tokenizer: tokenizers.Tokenizer, tokenizer_path, eos_ids: Sequence[int]) -> int:
  """generation_config.json's pad_token_id, else the tokenizer's pad token (data.text),
  else the first eos id (transformers' fallback), else 0: padding is masked, any id serves."""
  pad = _as_ids(_generation_config(pathlib.Path(tokenizer_path).parent).get('pad_token_id'))
  if pad:
    return pad[0]
  try:
    return text.pad_token_id(tokenizer, str(tokenizer_path))
  except ValueError:
    return eos_ids[0] if eos_ids else 0


def cut_at_stop(tokenizer: tokenizers.Tokenizer, new_ids: Sequence[int],
                stop: Sequence[str]) -> tuple[list[int], str]:
  """(ids, text) of new_ids cut at the first stop string the generation completed: the
  ids up to the token that completed it, the text up to where it begins (as vLLM's
  stop strings); without one, all ids and their text."""
  new_ids, stop = list(new_ids), [s for s in stop if s]
  text = tokenizer.decode(new_ids)
  if not any(s in text for s in stop):
    return new_ids, text
  for k in range(1, len(new_ids) + 1):
    text = tokenizer.decode(new_ids[:k])
    starts = [text.find(s) for s in stop if s in text]
    if starts:
      return new_ids[:k], text[:min(starts)]
  raise AssertionError('unreachable: the whole text holds a stop string')


class TextGenerator:
  """A decoder, its tokenizer (a tokenizer.json; tokenizer_config.json,
  generation_config.json and the chat template beside it) and optionally its adapters
  under a subnet: prompts in, `Completion`s out."""

  def __init__(self, model, params, tokenizer_path, *, adapters=None, subnet=None):
    _init_cache(model)
    self.model, self.params, self.adapters = model, params, adapters
    self.subnet = None if adapters is None else peft.check_subnet(adapters.spec, subnet)
    self.tokenizer_path = pathlib.Path(tokenizer_path)
    # Rows are left-padded here, and prompts never cut.
    self.tokenizer = text.raw_tokenizer(tokenizer_path)
    self.eos_ids = stop_token_ids(self.tokenizer, tokenizer_path)
    self.pad_id = _pad_id(self.tokenizer, tokenizer_path, self.eos_ids)

  def encode(self, prompt: str, chat: bool = False) -> list[int]:
    """The prompt's ids with the tokenizer's special tokens (e.g. bos); with `chat`, as a
    single user message in the checkpoint's chat template, ready for the reply."""
    if not chat:
      return self.tokenizer.encode(prompt).ids
    from glora_jax.data import chat as chat_lib
    directory = self.tokenizer_path.parent
    template = chat_lib.load_template(directory)
    if template is None:
      raise errors.DataError(f'chat: {directory} has no chat template (no '
                             f'{chat_lib.TEMPLATE_FILE}, no chat_template in '
                             f'{chat_lib.CONFIG_FILE}); expected one, or leave chat off')
    rendered = chat_lib.render(template, [{'role': 'user', 'content': prompt}],
                               add_generation_prompt=True,
                               tokens=chat_lib.special_tokens(directory))
    return self.tokenizer.encode(rendered, add_special_tokens=False).ids

  def __call__(self, prompts: Sequence[str], *, max_new_tokens: int = 128,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
               stop: Sequence[str] = (), chat: bool = False,
               batch_size: int = 8) -> list[Completion]:
    """Completions of `prompts`, generated `batch_size` at a time (see `generate`); the
    batch of index i samples with key fold_in(key(seed), i)."""
    encoded = [self.encode(p, chat) for p in prompts]
    for i, ids in enumerate(encoded):
      if not ids:
        raise errors.DataError(f'prompt {i} ({prompts[i]!r}) encodes to no tokens; expected '
                               'at least one')
    check_positions(self.model, max(map(len, encoded)), max_new_tokens)  # before any batch runs
    rows = min(batch_size, len(encoded))
    out = []
    for b, start in enumerate(range(0, len(encoded), rows)):
      chunk = encoded[start:start + rows]
      # A short last batch is filled with copies (dropped below): one batch shape, one program.
      ids, mask = self._left_pad(chunk + [chunk[0]] * (rows - len(chunk)), max_new_tokens)
      result = generate(self.model, self.params, ids, mask, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, top_k=top_k,
                        eos_ids=self.eos_ids, pad_id=self.pad_id,
                        rng=jax.random.fold_in(jax.random.key(seed), b),
                        adapters=self.adapters, subnet=self.subnet)
      new_ids, lengths = np.asarray(result.ids), np.asarray(result.lengths)
      for r, prompt_ids in enumerate(chunk):
        kept, text = cut_at_stop(self.tokenizer, new_ids[r, :lengths[r]].tolist(), stop)
        out.append(Completion(prompts[start + r], list(prompt_ids), kept, text))
    return out

  def _left_pad(self, rows: list[list[int]], max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    longest = max(len(r) for r in rows)
    width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    window = getattr(self.model.config, 'sliding_window', None)
    if window is not None and width + max_new_tokens > window:
      width = longest  # the cache must stay within the window the model attends to
    ids = np.full((len(rows), width), self.pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
      ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


# --------------------------------------------------------------------------- #
# Loading: a HF checkpoint, a search.py export or a train.py workdir
# --------------------------------------------------------------------------- #


def load(directory, *, subnet_file=None, dtype=None) -> TextGenerator:
  """A TextGenerator for `directory`: a HF decoder checkpoint (config.json, safetensors,
  tokenizer.json), a search.py output directory (its merged hf/ checkpoint), or a
  train.py workdir (the frozen base with its trained adapters under the run's subnet; a
  supernet's under `subnet_file`, a subnet JSON as search.py writes, else its largest).
  dtype: a checkpoint's parameters and activations (registry.load); a workdir runs in
  the dtypes it trained with. What is not one of these is a ConfigError naming what was
  expected."""
  path = pathlib.Path(directory)
  if not path.is_dir():
    raise errors.ConfigError(f'model directory {path} does not exist; expected a HF checkpoint, '
                             'a search.py output directory or a train.py workdir')
  if (path / 'checkpoints').is_dir() and (path / registry.CONFIG).is_file():
    if dtype is not None:
      raise errors.ConfigError(f'{path} is a train.py workdir, which runs in the dtypes it '
                               f'trained with; dtype {dtype} applies to a HF checkpoint')
    return _load_workdir(path, subnet_file)
  if subnet_file:
    raise errors.ConfigError(f'a subnet file ({subnet_file}) chooses among trained adapters; '
                             f'{path} is not a train.py workdir (no checkpoints/)')
  if not (path / registry.CONFIG).is_file() and (path / 'hf' / registry.CONFIG).is_file():
    path = path / 'hf'  # search.py's output: the merged model in its HF layout
  if not (path / registry.CONFIG).is_file():
    raise errors.ConfigError(
        f'{path} is neither a HF checkpoint (config.json, *.safetensors, tokenizer.json), a '
        'search.py output directory (hf/ inside; written with --export_formats torch) nor a '
        'train.py workdir (config.json, checkpoints/)')
  try:
    model, params = registry.load(path, dtype)
    tokenizer = registry.tokenizer_path({'checkpoint': str(path)})
  except ValueError as e:  # an unknown family, a malformed config.json, a missing tensor
    raise errors.ConfigError(str(e)) from None
  _check_decoder(model, path)
  return TextGenerator(model, params, tokenizer)


def _check_decoder(model, path) -> None:
  try:
    _init_cache(model)
  except ValueError as e:
    raise errors.ConfigError(f'{path}: {e}') from None


def _load_workdir(path: pathlib.Path, subnet_file) -> TextGenerator:
  from glora_jax import subnet as subnet_lib
  from glora_jax.train import setup
  run, trainable = setup.load_trained(path)
  _check_decoder(run.model_data.model, path)
  params = peft.combine(run.frozen, trainable['model'])
  adapters = subnet = None
  if run.spec is not None:
    adapters = peft.Adapters(params=trainable['adapters'], spec=run.spec)
    subnet = setup.eval_subnet(run)
    if subnet_file:
      if run.fixed_subnet is not None or not run.spec.searchable:
        raise errors.ConfigError(f'{path} trained one subnet (not a supernet); a subnet file '
                                 f'({subnet_file}) chooses within a GLoRA supernet')
      try:
        subnet = subnet_lib.loads(run.spec, pathlib.Path(subnet_file).read_text())
      except (OSError, ValueError) as e:
        raise errors.ConfigError(f'subnet file {subnet_file}: {e}; expected a subnet JSON as '
                                 'search.py writes (best_subnet.json)') from None
  elif subnet_file:
    raise errors.ConfigError(f'{path} trained no adapters (method {run.config.method}); a '
                             f'subnet file ({subnet_file}) chooses among adapters')
  try:
    tokenizer = registry.tokenizer_path(run.config.model)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  return TextGenerator(run.model_data.model, params, tokenizer, adapters=adapters, subnet=subnet)


def read_prompts(path) -> list[str]:
  """The prompts of a file: JSON lines with a "prompt" field (when its first non-blank
  line is a JSON object), else one prompt per non-blank line."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.DataError(f'prompts file {path} does not exist; expected one prompt per line '
                           'or JSON lines with a "prompt" field')
  lines = [(n, line) for n, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1)
           if line.strip()]
  if not lines:
    raise errors.DataError(f'prompts file {path} holds no prompt; expected one prompt per line '
                           'or JSON lines with a "prompt" field')
  if not lines[0][1].lstrip().startswith('{'):
    return [line for _, line in lines]
  prompts = []
  for n, line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise errors.DataError(f'{path}:{n}: not valid JSON ({e}); expected JSON lines with a '
                             '"prompt" field') from None
    if not isinstance(record, dict) or not isinstance(record.get('prompt'), str):
      raise errors.DataError(f'{path}:{n}: no "prompt" string; expected JSON lines with a '
                             '"prompt" field')
    prompts.append(record['prompt'])
  return prompts
