"""Tests of chat rendering: transformers' own apply_chat_template output (hf_chat_reference.json,
from scripts/make_torch_fixtures.py --only chat) reproduced text for text and id for id.

Also ShareGPT records, the assistant spans the loss covers, and the sandbox's refusals.
"""
import datetime
import json
import pathlib
import shutil

import jinja2
import pytest
import tokenizers

from glora_jax.data import chat
from glora_jax.errors import DataError

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
REFERENCE = json.loads((FIXTURES / 'hf_chat_reference.json').read_text(encoding='utf-8'))
CHAT_DIRS = sorted(REFERENCE['cases'])
# What each template writes around an assistant's content: the span the loss covers.
RESPONSE_FORMS = {'hf_llama3': '{}<|eot_id|>', 'hf_qwen2': '{}<|im_end|>\n',
                  'hf_mistral': ' {}</s>'}


def cases(name):
  return {(c['conversation'], c['add_generation_prompt']): c for c in REFERENCE['cases'][name]}


def assert_renders_reference(tokenizer_dir, name):
  template, tokens = chat.require_template(tokenizer_dir), chat.special_tokens(tokenizer_dir)
  tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_dir / 'tokenizer.json'))
  for case in REFERENCE['cases'][name]:
    text = chat.render(template, case['messages'],
                       add_generation_prompt=case['add_generation_prompt'], tokens=tokens,
                       **case['variables'])
    assert text == case['text'], (name, case['conversation'], case['add_generation_prompt'])
    # apply_chat_template(tokenize=True) encodes the text without adding special tokens.
    assert tokenizer.encode(text, add_special_tokens=False).ids == case['ids'], case['conversation']


@pytest.mark.parametrize('name', CHAT_DIRS)
def test_render_matches_transformers(name):
  assert set(CHAT_DIRS) == {'hf_llama3', 'hf_qwen2', 'hf_mistral'}
  assert len(REFERENCE['cases'][name]) >= 10
  assert_renders_reference(FIXTURES / name, name)


def test_template_from_tokenizer_config(tmp_path):
  """Older checkpoints keep the template in tokenizer_config.json: a string, or a list of
  {name, template} whose 'default' is the one used."""
  legacy = shutil.copytree(FIXTURES / 'hf_mistral', tmp_path / 'hf_mistral')
  template = (legacy / 'chat_template.jinja').read_text(encoding='utf-8')
  (legacy / 'chat_template.jinja').unlink()
  config = json.loads((legacy / 'tokenizer_config.json').read_text())
  (legacy / 'tokenizer_config.json').write_text(json.dumps({**config, 'chat_template': template}))
  assert chat.load_template(legacy) == template
  assert_renders_reference(legacy, 'hf_mistral')

  listed = [{'name': 'tool_use', 'template': 'tools'}, {'name': 'default', 'template': template}]
  (legacy / 'tokenizer_config.json').write_text(json.dumps({**config, 'chat_template': listed}))
  assert chat.load_template(legacy) == template
  (legacy / 'tokenizer_config.json').write_text(json.dumps({**config, 'chat_template': listed[:1]}))
  with pytest.raises(DataError, match=r"\['tool_use'\] but none named 'default'"):
    chat.load_template(legacy)


def test_no_template(tmp_path):
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '</s>'}))
  assert chat.load_template(tmp_path) is None
  with pytest.raises(chat.TemplateMissing) as raised:
    chat.require_template(tmp_path)
  assert str(raised.value) == (
      f'tokenizer dir {tmp_path} has no chat template (no chat_template.jinja, no chat_template in '
      "tokenizer_config.json); use data.format='alpaca' or 'text', or add one")
  assert isinstance(raised.value, ValueError)


def test_special_tokens(tmp_path):
  assert chat.special_tokens(FIXTURES / 'hf_mistral') == {
      'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>', 'pad_token': '</s>'}
  assert chat.special_tokens(FIXTURES / 'hf_qwen2') == {
      'eos_token': '<|endoftext|>', 'pad_token': '<|endoftext|>'}  # bos null: left out
  # AddedToken dicts, the model's own named tokens; flags that end in _token are no tokens.
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({
      'bos_token': {'__type': 'AddedToken', 'content': '<s>', 'lstrip': False},
      'eos_token': '</s>', 'image_token': '<image>', 'add_bos_token': True,
      'extra_special_tokens': {'audio_token': {'content': '<audio>'}}}))
  assert chat.special_tokens(tmp_path) == {'bos_token': '<s>', 'eos_token': '</s>',
                                           'image_token': '<image>', 'audio_token': '<audio>'}


def test_sharegpt_records():
  case = cases('hf_qwen2')[('sharegpt', False)]
  assert chat.to_messages(case['record']) == case['messages']
  messages = [{'role': 'user', 'content': 'Hi'}]
  assert chat.to_messages({'messages': messages}) is messages
  assert chat.to_messages({'conversations': [{'from': 'chatgpt', 'value': 'Hi'}]}) == [
      {'role': 'assistant', 'content': 'Hi'}]
  with pytest.raises(DataError, match=r"turn 1 is from 'bing'; expected one of \['assistant', "):
    chat.to_messages({'conversations': [{'from': 'human', 'value': 'Hi'},
                                        {'from': 'bing', 'value': 'Hello'}]})
  with pytest.raises(DataError, match=r"turn 0 has keys \['role', 'value'\]"):
    chat.to_messages({'conversations': [{'role': 'human', 'value': 'Hi'}]})
  with pytest.raises(DataError, match=r"record has keys \['id', 'text'\]; expected 'messages'"):
    chat.to_messages({'text': 'Hi', 'id': 3})


@pytest.mark.parametrize('name', CHAT_DIRS)
def test_response_spans_cover_the_assistant_turns(name):
  case = cases(name)[('multi_turn', False)]
  template, tokens = chat.require_template(FIXTURES / name), chat.special_tokens(FIXTURES / name)
  full, spans = chat.response_spans(template, case['messages'], tokens=tokens)
  assert full == case['text']
  answers = [m['content'] for m in case['messages'] if m['role'] == 'assistant']
  assert [full[start:end] for start, end in spans] == [
      RESPONSE_FORMS[name].format(answer) for answer in answers]
  assert spans[-1][1] == len(full)


def test_response_spans_refuse_templates_that_rewrite_earlier_turns():
  # Like reasoning templates that drop earlier turns' thinking: what came before changes.
  template = ('{% for m in messages %}{{ m.role }}:{{ m.content if loop.last else "..." }};'
              '{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}')
  messages = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'},
              {'role': 'user', 'content': 'Bye'}, {'role': 'assistant', 'content': 'Bye'}]
  with pytest.raises(DataError, match='cannot mark responses by prefix'):
    chat.response_spans(template, messages)


def test_template_errors_and_sandbox():
  mistral = chat.require_template(FIXTURES / 'hf_mistral')
  tokens = chat.special_tokens(FIXTURES / 'hf_mistral')
  with pytest.raises(jinja2.exceptions.TemplateError, match='roles must alternate'):
    chat.render(mistral, [{'role': 'user', 'content': 'a'}, {'role': 'user', 'content': 'b'}],
                tokens=tokens)
  # A downloaded template is untrusted code: no reaching Python internals, no mutation.
  for hostile in ("{{ ''.__class__.__mro__[1].__subclasses__() }}", '{{ messages.append(1) }}',
                  "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
                  '{{ dict.__class__.__base__.__subclasses__() }}',
                  '{% set ns = namespace(_secret=1) %}'):
    with pytest.raises(jinja2.exceptions.SecurityError):
      chat.render(hostile, [{'role': 'user', 'content': 'a'}])


def test_transformers_globals_and_filters(monkeypatch):
  monkeypatch.setattr(chat, '_now', lambda: datetime.datetime(2025, 12, 5))
  assert chat.render("{{ strftime_now('%d %b %Y') }}", []) == '05 Dec 2025'
  # tojson neither escapes HTML nor non-ASCII, and takes json.dumps' options.
  assert chat.render("{{ {'b': 'é<&>', 'a': 1} | tojson }}", []) == '{"b": "é<&>", "a": 1}'
  assert chat.render("{{ {'b': 1, 'a': 2} | tojson(indent=1, sort_keys=true) }}", []) == \
      '{\n "a": 2,\n "b": 1\n}'
  assert chat.render("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                     "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
                     [{'role': 'user', 'content': 'a'}, {'role': 'user', 'content': 'b'}]) == 'a'
  # Keys whose value is None are dropped, and tools/documents are None unless given.
  message = {'role': 'assistant', 'content': 'x', 'tool_calls': None}
  assert chat.render("{{ 'tool_calls' in messages[0] }} {{ tools is none }} {{ documents }}",
                     [message]) == 'False True None'
  assert chat.render('{{ eos_token }}{{ date_string }}', [], tokens={'eos_token': '</s>'},
                     date_string='today') == '</s>today'
