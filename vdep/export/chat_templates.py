"""Jinja chat templates that render vdep's training templates for transformers' processors.

Rendering a conversation with these templates gives the same string as `vdep.data.templates.render`
for the same turns (tests compare them), so the processor's input ids equal the training ids. Images in
a user message render as `<image>` followed by a newline, before the message text (LLaVA's data puts
`<image>\\n` first); a video part as `<video>` and a newline (OneVision's processor expands `<video>` into the
video's tokens, where vdep's data marks a video with `<image>`). As in LLaVA, no BOS is written: the tokenizer adds it.
"""

from __future__ import annotations

from ..data.templates import VICUNA_SYSTEM, ConversationTemplate, Qwen2Template, TokenizerChatTemplate

_TEXT_OF = (
    "{%- macro text_of(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<video>\\n' -}}"
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
    "{%- if message['content'] is string -%}{%- if '<image>' in message['content'] -%}{{- '<image>' -}}"
    "{%- elif '<video>' in message['content'] -%}{{- '<video>' -}}{%- endif -%}"
    "{%- else -%}{%- for part in message['content'] if part['type'] in ('image', 'video') -%}"
    "{{- '<' + part['type'] + '>' -}}{%- endfor -%}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# vdep's llama3 template; BOS comes from the tokenizer, as in training.
LLAMA3 = _TEXT_OF + (
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + text_of(message['content']) + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

# vdep's qwen2 template (ChatML with Qwen's default system message).
QWEN2 = _TEXT_OF + (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + Qwen2Template.system + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + text_of(message['content']) + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

CHAT_TEMPLATES = {"vicuna_v1": VICUNA_V1, "plain": PLAIN, "llama3": LLAMA3, "qwen2": QWEN2}


def export_chat_template(template: ConversationTemplate) -> str:
    """The chat template an export carries for a run trained with `template`.

    `chat_template` runs trained on the tokenizer's own template. Exported, it is wrapped so that it
    sees what it saw in training: message contents as text (an image part becomes `<image>` and a
    newline, which most tokenizer templates could not render), and without the BOS it writes when the
    tokenizer adds one itself (training strips that BOS; the processor adds it).
    """
    if template.name in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[template.name]
    if not isinstance(template, TokenizerChatTemplate):
        raise TypeError(f"no export chat template for the training template {template.name!r}")
    own = template.tokenizer.chat_template
    as_text = (
        "{%- set ns_vdep = namespace(messages=[]) -%}"
        "{%- for message in messages -%}"
        "{%- set ns_vdep.messages = ns_vdep.messages + [{'role': message['role'], 'content': text_of(message['content'])}] -%}"
        "{%- endfor -%}"
        "{%- set messages = ns_vdep.messages -%}"
    )
    if not template.strip_bos:
        return _TEXT_OF + as_text + own
    return (_TEXT_OF + as_text + "{% set rendered_vdep %}" + own + "{% endset %}"
            "{%- if bos_token and rendered_vdep.startswith(bos_token) -%}{{- rendered_vdep[bos_token | length:] -}}"
            "{%- else -%}{{- rendered_vdep -}}{%- endif -%}")
