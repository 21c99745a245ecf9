"""Chat data: a checkpoint's own chat template rendered exactly as transformers'
`apply_chat_template(..., tokenize=False)` renders it, and the assistant spans the loss covers.

A template ships with a downloaded checkpoint and is untrusted code, so it runs in jinja2's
ImmutableSandboxedEnvironment with transformers' settings, filters and globals
(transformers/utils/chat_template_utils.py `_cached_compile_jinja_template`,
`render_jinja_template`; tokenization_utils_base.py `apply_chat_template`).
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
from typing import Any, Mapping

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np

from glora_jax import errors

TEMPLATE_FILE = 'chat_template.jinja'
CONFIG_FILE = 'tokenizer_config.json'
# transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order: what special_tokens_map holds.
NAMED_TOKENS = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token',
                'mask_token')
# ShareGPT's `from` values; anything else is refused rather than guessed.
SHAREGPT_ROLES = {'human': 'user', 'user': 'user', 'gpt': 'assistant', 'assistant': 'assistant',
                  'chatgpt': 'assistant', 'system': 'system'}
# Names a message's reasoning comes under; templates read the first (transformers aliases them).
REASONING_FIELDS = ('reasoning_content', 'thinking', 'reasoning')


class TemplateMissing(errors.DataError):
  """A tokenizer directory without a chat template, asked for chat data."""


# --------------------------------------------------------------------------- #
# Reading a checkpoint's tokenizer directory.
# --------------------------------------------------------------------------- #

def _config(tokenizer_dir: str | os.PathLike) -> dict:
  path = pathlib.Path(tokenizer_dir) / CONFIG_FILE
  return json.loads(path.read_text(encoding='utf-8')) if path.is_file() else {}


def load_template(tokenizer_dir: str | os.PathLike) -> str | None:
  """The directory's chat template: chat_template.jinja (current transformers writes it, and
  it wins over the config when both exist, as in transformers), else tokenizer_config.json's
  `chat_template` (a string, or a list of {name, template} of which 'default' is used);
  None when it has neither."""
  path = pathlib.Path(tokenizer_dir) / TEMPLATE_FILE
  if path.is_file():
    return path.read_text(encoding='utf-8')
  template = _config(tokenizer_dir).get('chat_template')
  if template is None or isinstance(template, str):
    return template
  if isinstance(template, list):
    named = {entry.get('name'): entry.get('template') for entry in template
             if isinstance(entry, dict)}
    if isinstance(named.get('default'), str):
      return named['default']
    raise errors.DataError(
        f"{pathlib.Path(tokenizer_dir) / CONFIG_FILE}: chat_template lists templates "
        f"{sorted(map(str, named))} but none named 'default'; expected a 'default' entry")
  raise errors.DataError(
      f'{pathlib.Path(tokenizer_dir) / CONFIG_FILE}: chat_template is a {type(template).__name__}; '
      'expected a string or a list of {name, template}')


def require_template(tokenizer_dir: str | os.PathLike) -> str:
  """load_template, or TemplateMissing saying what to do instead."""
  template = load_template(tokenizer_dir)
  if template is None:
    raise TemplateMissing(
        f'tokenizer dir {tokenizer_dir} has no chat template (no {TEMPLATE_FILE}, no chat_template '
        f"in {CONFIG_FILE}); use data.format='alpaca' or 'text', or add one")
  return template


def _token_text(value: Any) -> str | None:
  """A token as the config stores it: a string, or an AddedToken dict with its 'content'."""
  if isinstance(value, dict):
    value = value.get('content')
  return value if isinstance(value, str) else None


def special_tokens(tokenizer_dir: str | os.PathLike) -> dict[str, str]:
  """The special-token strings transformers passes to the template (its special_tokens_map):
  the named ones (bos_token, eos_token, unk_token, sep_token, pad_token, cls_token,
  mask_token) and the model's own named tokens (other '*_token' keys, a dict
  extra_special_tokens); those that are None are left out, as transformers leaves them out.

  A legacy special_tokens_map.json overrides the config where the config has no
  added_tokens_decoder, as transformers' loader does.
  """
  config = _config(tokenizer_dir)
  legacy = pathlib.Path(tokenizer_dir) / 'special_tokens_map.json'
  if 'added_tokens_decoder' not in config and legacy.is_file():
    config = {**config, **json.loads(legacy.read_text(encoding='utf-8'))}
  tokens = {name: _token_text(config.get(name)) for name in NAMED_TOKENS}
  for name, value in config.items():
    if name.endswith('_token') and name not in NAMED_TOKENS:
      tokens[name] = _token_text(value)
  for group in ('extra_special_tokens', 'model_specific_special_tokens'):
    if isinstance(config.get(group), dict):
      tokens.update({name: _token_text(value) for name, value in config[group].items()})
  return {name: value for name, value in tokens.items() if value is not None}


# --------------------------------------------------------------------------- #
# Rendering.
# --------------------------------------------------------------------------- #

class _GenerationTag(jinja2.ext.Extension):
  """transformers' `{% generation %}...{% endgeneration %}` tag (its assistant-mask tracker):
  templates that use it must compile; we render the body as is and find responses by prefix."""
  tags = {'generation'}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method('_body'), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
  """transformers' namespace: no underscore-prefixed attributes, so a template cannot reach
  CPython internals through one."""

  def __init__(*args, **kwargs):  # noqa: N805 - jinja2.utils.Namespace's own signature trick
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check_name(name):
    if isinstance(name, str) and name.startswith('_'):
      raise jinja2.exceptions.SecurityError(
          'chat templates cannot store underscore-prefixed attributes on a namespace, '
          f'got {name!r}')


class _TemplateDict:
  """transformers' `dict` global: builds dicts, exposes nothing of the dict type itself."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # jinja2's own tojson escapes HTML characters; transformers' does not, and exposes these options.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _now() -> datetime.datetime:
  """The clock strftime_now reads (a module function so that tests can fix the date)."""
  return datetime.datetime.now()


def _strftime_now(format):  # noqa: A002 - the name templates call it with
  return _now().strftime(format)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters['tojson'] = _tojson
  env.globals['raise_exception'] = _raise_exception
  env.globals['strftime_now'] = _strftime_now
  env.globals['dict'] = _TemplateDict()
  env.globals['namespace'] = _TemplateNamespace
  return env.from_string(template)


def _plain(value: Any) -> Any:
  """Plain JSON-like data for the template (transformers' _plain_template_data): subclasses
  of str, int and float lose their extra methods, anything else becomes an inert '<Type>'."""
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, str):
    return str.__str__(value)
  if isinstance(value, int):
    return int.__int__(value)
  if isinstance(value, float):
    return float.__float__(value)
  if isinstance(value, Mapping):
    return {_plain(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_plain(v) for v in value]
  if isinstance(value, tuple):
    return tuple(_plain(v) for v in value)
  if isinstance(value, np.generic):
    return _plain(value.item())
  return f'<{type(value).__name__}>'


def _template_messages(messages: list[dict]) -> list[dict]:
  """The messages as transformers hands them to the template: keys whose value is None
  dropped (templates test for a missing key, not for None), reasoning under every name."""
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise errors.DataError(f'message {i} is a {type(message).__name__}; expected a dict with '
                             "'role' and 'content'")
    message = _plain({k: v for k, v in message.items() if v is not None})
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
      message = {'thinking': reasoning, **message, 'reasoning_content': reasoning}
    out.append(message)
  return out


def render(template: str, messages: list[dict], *, add_generation_prompt: bool = False,
           tokens: dict | None = None, **extra) -> str:
  """The conversation as the template writes it, as apply_chat_template(tokenize=False) does:
  the context is messages, tools and documents (None unless given in extra; tools as JSON
  schemas), add_generation_prompt, the special tokens, and any other template variables in
  extra (e.g. date_string), which win over a token of the same name."""
  tools, documents = extra.pop('tools', None), extra.pop('documents', None)
  for kind, items in (('tools', tools), ('documents', documents)):
    if items is not None and not all(isinstance(item, Mapping) for item in items):
      raise errors.DataError(f'{kind} must be a list of dicts (JSON schemas for tools, '
                             f"'title' and 'text' for documents); got {items!r}")
  return _compile(template).render(
      messages=_template_messages(messages), tools=_plain(tools), documents=_plain(documents),
      add_generation_prompt=add_generation_prompt, **_plain({**(tokens or {}), **extra}))


# --------------------------------------------------------------------------- #
# Records and loss spans.
# --------------------------------------------------------------------------- #

def to_messages(record: dict) -> list[dict]:
  """A record's conversation as role/content messages: its `messages` as they are, or
  ShareGPT's `conversations` (from human/user, gpt/assistant/chatgpt, system; value)."""
  if 'messages' in record:
    messages = record['messages']
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) and 'role' in m
                                                 for m in messages):
      raise errors.DataError("record's 'messages' must be a list of dicts with 'role' and "
                             f"'content'; got {messages!r:.200}")
    return messages
  if 'conversations' in record:
    messages = []
    for i, turn in enumerate(record['conversations']):
      if not isinstance(turn, Mapping) or 'from' not in turn or 'value' not in turn:
        keys = sorted(turn) if isinstance(turn, Mapping) else type(turn).__name__
        raise errors.DataError(f"ShareGPT turn {i} has keys {keys}; expected 'from' and 'value'")
      role = SHAREGPT_ROLES.get(turn['from'])
      if role is None:
        raise errors.DataError(f"ShareGPT turn {i} is from {turn['from']!r}; expected one of "
                               f'{sorted(SHAREGPT_ROLES)}')
      messages.append({'role': role, 'content': turn['value']})
    return messages
  raise errors.DataError(f'record has keys {sorted(record)}; expected \'messages\' (role, content) '
                         "or ShareGPT's 'conversations' (from, value)")


def response_spans(template: str, messages: list[dict], *, tokens: dict | None = None,
                   **extra) -> tuple[str, list[tuple[int, int]]]:
  """The rendered conversation and the character span [start, end) of each assistant
  response in it, the part the loss is put on: what the template writes after the
  generation prompt up to and including its end-of-turn token, which the model must learn
  to emit. Found by prefixes (assistant message i: render(messages[:i], generation prompt)
  and render(messages[:i + 1]) must each start the next), which holds for the usual
  templates; one that rewrites earlier turns cannot mark responses this way."""
  full = render(template, messages, tokens=tokens, **extra)
  spans = []
  for i, message in enumerate(messages):
    if message.get('role') != 'assistant':
      continue
    prefix = render(template, messages[:i], add_generation_prompt=True, tokens=tokens, **extra)
    upto = render(template, messages[:i + 1], tokens=tokens, **extra)
    if not (upto.startswith(prefix) and full.startswith(upto)):
      which = ('the conversation up to it does not start with its generation prompt'
               if not upto.startswith(prefix) else
               'the whole conversation does not start with the conversation up to it')
      raise errors.DataError(
          f'chat template renders assistant message {i} so that {which}; this template cannot '
          'mark responses by prefix (expected each rendered prefix to start the next)')
    spans.append((len(prefix), len(upto)))
  return full, spans
