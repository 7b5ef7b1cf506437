"""Jinja chat templates that render vdep's training templates for transformers' processors.

Rendering a conversation with these templates gives the same string as `vdep.data.templates.render`
for the same turns (tests compare them), so the processor's input ids equal the training ids. Images in
a user message render as `<image>` followed by a newline, before the message text (LLaVA's data puts
`<image>\\n` first). As in LLaVA, no BOS is written: the tokenizer adds it.
"""

from __future__ import annotations

from ..data.templates import VICUNA_SYSTEM

_TEXT_OF = (
    "{%- macro text_of(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

VICUNA_V1 = _TEXT_OF + (
    "{%- set ns = namespace(system='" + VICUNA_SYSTEM.replace("'", "\\'") + "', first=true) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.system = text_of(messages[0]['content']) -%}{%- endif -%}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if ns.first -%}{{- ns.system + ' ' -}}{%- set ns.first = false -%}{%- endif -%}"
    "{{- 'USER: ' + text_of(message['content']) + ' ASSISTANT:' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' + text_of(message['content']) + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# LLaVA's alignment template: only the image and the caption; the user's words are dropped.
PLAIN = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if message['content'] is string -%}{%- if '<image>' in message['content'] -%}{{- '<image>' -}}{%- endif -%}"
    "{%- else -%}{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<image>' -}}{%- endfor -%}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

CHAT_TEMPLATES = {"vicuna_v1": VICUNA_V1, "plain": PLAIN}
