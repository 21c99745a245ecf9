"""Checkpoint reading (safetensors single or sharded, bf16 included, and npz; no torch) and
strict conversion between checkpoint keys and Flax paths, both ways from one rule table
(`convert` reads it forwards, `invert` backwards), reporting every problem in one error."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from glora_jax.paths import flatten, key_name, natural_key, unflatten  # noqa: F401 (re-exported)

PathLike = str | os.PathLike
Array = Any

# --------------------------------------------------------------------------- #
# Reading files
# --------------------------------------------------------------------------- #

_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}


def _read_one_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  # Parsed by hand because safetensors' numpy backend rejects bfloat16, and the
  # format is just a JSON header followed by raw little-endian buffers.
  with open(path, 'rb') as f:
    header_len = int(np.frombuffer(f.read(8), '<u8')[0])
    header = json.loads(f.read(header_len))
  data = np.memmap(path, dtype=np.uint8, mode='r', offset=8 + header_len)
  out = {}
  for key, info in header.items():
    if key == '__metadata__':
      continue
    if info['dtype'] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor '{key}' has dtype {info['dtype']}; expected one of "
                       f'{sorted(_SAFETENSORS_DTYPES)}')
    start, end = info['data_offsets']
    dtype = np.dtype(_SAFETENSORS_DTYPES[info['dtype']]).newbyteorder('<')
    # Copy out of the memmap so the file can be closed and arrays are writable.
    out[key] = np.array(data[start:end].view(dtype).reshape(info['shape']))
  return out


def read_safetensors(path: PathLike) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint: a .safetensors file, a sharded
  `*.safetensors.index.json`, or a directory holding either (HF layout)."""
  path = pathlib.Path(path)
  if path.is_dir():
    for name in ('model.safetensors', 'model.safetensors.index.json'):
      if (path / name).is_file():
        return read_safetensors(path / name)
    raise ValueError(f'{path} holds neither model.safetensors nor '
                     'model.safetensors.index.json')
  if not path.is_file():
    raise ValueError(f'checkpoint {path} does not exist')
  if path.name.endswith('.index.json'):
    index = json.loads(path.read_text())
    if 'weight_map' not in index:
      raise ValueError(f"{path}: expected a 'weight_map' in the index; found keys "
                       f'{sorted(index)}')
    out = {}
    for shard in sorted(set(index['weight_map'].values())):
      tensors = _read_one_safetensors(path.parent / shard)
      out.update(tensors)
    missing = sorted(set(index['weight_map']) - set(out))
    if missing:
      raise ValueError(f'{path}: the index lists tensors that no shard holds: {missing}')
    return out
  return _read_one_safetensors(path)


def read_npz(path: PathLike) -> dict[str, np.ndarray]:
  """All arrays of an .npz checkpoint, keys as stored ('/'-joined in Google's)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f'checkpoint {path} does not exist')
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


# --------------------------------------------------------------------------- #
# Trees and paths
# --------------------------------------------------------------------------- #


def param_shapes(model, *example_args, **example_kwargs) -> dict[str, tuple[int, ...]]:
  """{path: shape} of a linen module's params, without allocating them."""
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_args,
                                                **example_kwargs))
  return {k: tuple(v.shape) for k, v in flatten(variables['params']).items()}


def random_params(shapes: Mapping[str, tuple[int, ...]], seed: int = 0, scale: float = 0.1) -> dict:
  """Random float32 params of the given {path: shape}, for tests and benchmarks.

  numpy, not `model.init`: eager init compiles one XLA program per leaf shape,
  which takes seconds on CPU even for a tiny model."""
  rng = np.random.default_rng(seed)
  return unflatten({p: jnp.asarray(rng.standard_normal(s, np.float32) * scale
                                   + (1.0 if p.endswith('/scale') else 0.0))
                    for p, s in shapes.items()})


def cast(tree, dtype):
  """Casts floating leaves to `dtype` (integer leaves are left alone). Host (numpy)
  leaves, as the readers give them, stay on the host: a checkpoint is never put on a
  device whole here, so a quantized base (model.frozen_quant) quantizes it one kernel
  at a time (setup.quantize_frozen) and the rest goes to the devices with its
  shardings. Device arrays (a random init) stay device arrays."""
  if dtype is None:
    return tree

  def one(x):
    host = isinstance(x, np.ndarray) or np.isscalar(x)
    xp = np if host else jnp
    x = xp.asarray(x)
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(one, tree)


# --------------------------------------------------------------------------- #
# Strict conversion
# --------------------------------------------------------------------------- #


def identity(x):
  """A leaf stored as the checkpoint stores it (the default transform)."""
  return x


def transpose(x):
  """torch Linear weight (out, in) -> Flax Dense kernel (in, out); its own inverse."""
  return np.swapaxes(x, -1, -2)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One Flax leaf built from checkpoint keys: `target` (a '/'-joined path) is
  `transform(*[checkpoint[k] for k in sources])`. Read backwards by `invert`."""

  target: str
  sources: tuple[str, ...]
  transform: Callable[..., np.ndarray] = identity


def _fmt_shape(shape) -> str:
  return str(tuple(int(d) for d in shape))


def convert(checkpoint: Mapping[str, np.ndarray], rules: Sequence[Rule],
            expected: Mapping[str, tuple[int, ...]], *, source: str, model: str,
            ignore: Iterable[str] = (), optional: Iterable[str] = ()) -> dict[str, Any]:
  """Builds the whole parameter tree from `checkpoint` and validates it.

  Every problem is collected first (a checkpoint key that is missing, a key no rule
  uses, a leaf of the wrong shape, a model leaf no rule fills) and reported in ONE
  ValueError naming each key with expected and found shapes; nothing is returned
  half-loaded. `ignore`: regexes of checkpoint keys that may be left unused (e.g.
  a pooler the model does not have). `optional`: regexes of model paths that may
  stay unfilled (e.g. a fresh head); they are absent from the result.
  """
  ignore = [re.compile(p) for p in ignore]
  optional = [re.compile(p) for p in optional]
  missing, wrong, unfilled, bad_transform = [], [], [], []
  used: set[str] = set()
  flat: dict[str, np.ndarray] = {}
  for rule in rules:
    if rule.target not in expected:
      # A rule for a leaf the model does not have is a programming error in the
      # importer, not a checkpoint problem: fail loudly with the evidence.
      raise ValueError(f"importer for {model} maps to '{rule.target}', which the model "
                       f'does not have; model paths look like {sorted(expected)[:4]}')
    absent = [k for k in rule.sources if k not in checkpoint]
    used.update(k for k in rule.sources if k in checkpoint)
    if absent:
      for k in absent:
        missing.append(f"  missing key '{k}' (for '{rule.target}', expected shape "
                       f'{_fmt_shape(expected[rule.target])} in the model)')
      continue
    arrays = [np.asarray(checkpoint[k]) for k in rule.sources]
    try:
      value = np.asarray(rule.transform(*arrays))
    except (ValueError, TypeError) as e:
      found = ', '.join(f"'{k}' {_fmt_shape(a.shape)}" for k, a in zip(rule.sources, arrays))
      bad_transform.append(f"  wrong shape: {found} cannot become '{rule.target}' with "
                           f'expected shape {_fmt_shape(expected[rule.target])} ({e})')
      continue
    if tuple(value.shape) != tuple(expected[rule.target]):
      found = ', '.join(f"'{k}' {_fmt_shape(a.shape)}" for k, a in zip(rule.sources, arrays))
      wrong.append(f"  wrong shape: '{rule.target}' expected {_fmt_shape(expected[rule.target])}, "
                   f'found {_fmt_shape(value.shape)} (from {found})')
      continue
    flat[rule.target] = value
  targets = {r.target for r in rules}
  for path in sorted(expected, key=natural_key):
    if path not in targets and not any(p.fullmatch(path) for p in optional):
      unfilled.append(f"  model leaf '{path}' {_fmt_shape(expected[path])} is not in the "
                      'checkpoint')
  extra = [f"  unexpected key '{k}' {_fmt_shape(np.shape(checkpoint[k]))} (the model has no "
           'place for it)'
           for k in sorted(checkpoint, key=natural_key)
           if k not in used and not any(p.fullmatch(k) for p in ignore)]
  problems = missing + extra + wrong + bad_transform + unfilled
  if problems:
    hint = ''
    if rules and len(missing) == sum(len(r.sources) for r in rules):
      hint = (' None of the expected keys is present: this looks like a checkpoint of '
              'another architecture or format.')
    raise ValueError(f'{source} does not fit {model}: {len(problems)} problem(s).{hint}\n'
                     + '\n'.join(problems))
  return unflatten(flat)


def add_missing(params: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                pattern: str = r'.*/bias') -> dict:
  """Zeros for the leaves of `shapes` matching `pattern` that `params` lacks.

  A merged adapter gives a bias to some bias-less layers only; a model built with
  bias flags on (LLaMA's attention_bias, mlp_bias) needs one on every such layer."""
  flat, regex = flatten(params), re.compile(pattern)
  missing = [p for p in shapes if p not in flat and not regex.fullmatch(p)]
  if missing:
    raise ValueError(f'params lack {sorted(missing, key=natural_key)}, which do not match '
                     f"'{pattern}' and so are not filled with zeros")
  dtype = next(iter(flat.values())).dtype if flat else jnp.float32
  for p in shapes:
    if p not in flat:
      flat[p] = jnp.zeros(shapes[p], dtype)
  return unflatten(flat)


def strip_prefix(checkpoint: Mapping[str, Array], prefixes: Sequence[str]) -> dict[str, Array]:
  """Drops the first of `prefixes` that every key starts with (e.g. 'bert.',
  'model.'); unchanged when none fits all keys."""
  for prefix in prefixes:
    if checkpoint and all(k.startswith(prefix) for k in checkpoint):
      return {k[len(prefix):]: v for k, v in checkpoint.items()}
  return dict(checkpoint)


def read_json(path: PathLike) -> dict:
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f'{path} does not exist; expected a config.json beside the weights')
  return json.loads(path.read_text())


def require(config: Mapping[str, Any], key: str, expected, source: str) -> None:
  """Raises when a HF config field names another architecture or an unsupported option."""
  found = config.get(key, expected)
  if found != expected:
    raise ValueError(f"{source}: '{key}' is {found!r}; this importer supports {expected!r}")


# --------------------------------------------------------------------------- #
# The same rules, backwards: params -> checkpoint keys
# --------------------------------------------------------------------------- #


def _invert_transform(rule: Rule, value: np.ndarray) -> np.ndarray:
  """The checkpoint tensor that `rule.transform` turns into `value`.

  identity and transpose are their own inverses. Any other single-key transform that
  only moves elements (an axis permutation such as timm's conv kernel, a reshape) is
  inverted by pushing element indices through it: for each ordering of `value`'s
  dimensions (its own first) as the checkpoint shape, the transform of
  arange(size) must give `value`'s shape and every index once; that index map,
  read backwards, is the inverse. Nothing is written twice."""
  if rule.transform is identity:
    return value
  if rule.transform is transpose:
    return transpose(value)
  if len(rule.sources) != 1:
    raise ValueError(f"'{rule.target}' is built from {len(rule.sources)} checkpoint keys "
                     f'{list(rule.sources)}; only one-key rules can be read backwards')
  size = int(np.prod(value.shape))
  for shape in dict.fromkeys(itertools.permutations(value.shape)):
    index = np.arange(size).reshape(shape)
    try:
      moved = np.asarray(rule.transform(index))
    except (ValueError, TypeError):
      continue
    if (moved.shape != value.shape or not np.issubdtype(moved.dtype, np.integer)
        or not np.array_equal(np.sort(moved, axis=None), np.arange(size))):
      continue
    out = np.empty(size, value.dtype)
    out[moved.reshape(-1)] = value.reshape(-1)
    return out.reshape(shape)
  raise ValueError(f"the transform of '{rule.target}' (from '{rule.sources[0]}') is not a "
                   f'rearrangement of its elements at shape {_fmt_shape(value.shape)}, so it '
                   'cannot be read backwards')


def invert(params: Mapping[str, Any], rules: Sequence[Rule], *, model: str,
           optional: Iterable[str] = ()) -> dict[str, np.ndarray]:
  """Checkpoint tensors {key: array} from params: `convert` read backwards, so that
  `convert(invert(params, rules), rules, ...)` gives `params` back bit for bit.

  Each leaf keeps its dtype. Every problem is collected into ONE ValueError: a leaf
  a rule needs that `params` lacks, and a leaf that no rule reads (it would be lost).
  `optional`: regexes of paths that may be absent (e.g. a head)."""
  optional = [re.compile(p) for p in optional]
  flat = {k: v for k, v in flatten(params).items()}
  out: dict[str, np.ndarray] = {}
  missing, bad = [], []
  for rule in rules:
    if rule.target not in flat:
      if not any(p.fullmatch(rule.target) for p in optional):
        missing.append(f"  missing leaf '{rule.target}' (for '{rule.sources[0]}')")
      continue
    value = np.asarray(jax.device_get(flat[rule.target]))
    try:
      out[rule.sources[0]] = _invert_transform(rule, value)
    except ValueError as e:
      bad.append(f'  {e}')
  read = {r.target for r in rules}
  unread = [f"  leaf '{p}' {_fmt_shape(np.shape(flat[p]))} has no place in the checkpoint"
            for p in sorted(flat, key=natural_key) if p not in read]
  problems = missing + unread + bad
  if problems:
    raise ValueError(f'params do not fit {model}: {len(problems)} problem(s).\n'
                     + '\n'.join(problems))
  return out
