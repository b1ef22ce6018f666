"""The chat templates a recipe may name (``chat_template: chatml``), as declared records.

These are the public prompt formats of their model families, written out as Jinja for
``transformers``; mergekit 0.1.5 ships the same five under the same names, and a recipe that
names one must get the very text it gets there (a template's bytes are what a loader compares):

* ``chatml``: OpenAI's ChatML turns (``<|im_start|>role ... <|im_end|>``), as Hugging Face models use them;
* ``llama3``: Meta Llama 3's header/eot turns (``<|start_header_id|>``, ``<|eot_id|>``);
* ``mistral``: Mistral AI's instruct format (``[INST] ... [/INST]``, an optional system message);
* ``alpaca``: Stanford Alpaca's ``### Instruction:`` / ``### Response:`` sections;
* ``exaone``: LG AI Research EXAONE's ``[|role|]`` turns ending in ``[|endofturn|]``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    text: str


_CHATML = r"""{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}
{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}
"""

_LLAMA3 = r"""{% set loop_messages = messages %}
{% for message in loop_messages %}
{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}
{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}
{{ content }}
{% endfor %}
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}
"""

_MISTRAL = r"""{%- if messages[0]['role'] == 'system' %}
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
"""

_ALPACA_TURN = r"""{% elif message['role'] == '{role}' %}
### {section}:
{{ message['content']|trim -}}
{% if not loop.last %}


{% endif %}
"""

_ALPACA = (
    r"""{{ (messages|selectattr('role', 'equalto', 'system')|list|last).content|trim if (messages|selectattr('role', 'equalto', 'system')|list) else '' }}

{% for message in messages %}
"""
    + "".join(
        _ALPACA_TURN.replace("{role}", role).replace("{section}", section)
        for role, section in (("user", "Instruction"), ("assistant", "Response"), ("user_context", "Input"))
    ).replace("{% elif", "{% if", 1)
    + r"""{% endif %}
{% endfor %}
{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}
### Response:
{% endif %}
"""
)

_EXAONE = r"""{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
        {{ '[|system|][|endofturn|]\n' }}
    {% endif %}
    {{ '[|' + message['role'] + '|]' + message['content'] }}
    {% if message['role'] == 'user' %}
        {{ '\n' }}
    {% else %}
        {{ '[|endofturn|]\n' }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{ '[|assistant|]' }}
{% endif %}
"""

CHAT_TEMPLATES = {
    t.name: t
    for t in (
        ChatTemplate("chatml", _CHATML),
        ChatTemplate("llama3", _LLAMA3),
        ChatTemplate("mistral", _MISTRAL),
        ChatTemplate("alpaca", _ALPACA),
        ChatTemplate("exaone", _EXAONE),
    )
}
AUTO = "auto"  # the template most input models have


def template_problem(value: str) -> str | None:
    """Why ``chat_template: value`` is neither ``auto``, a declared name nor a Jinja template, or
    None. Short text without ``{`` is taken for a name, as mergekit does."""
    if value == AUTO or value in CHAT_TEMPLATES:
        return None
    if len(value) < 20 or "{" not in value:
        return f"{value!r} is neither auto, a built-in template ({', '.join(CHAT_TEMPLATES)}) nor a Jinja template"
    return None


def template_text(value: str) -> str:
    """The Jinja text of a declared name, or the literal template itself."""
    return CHAT_TEMPLATES[value].text if value in CHAT_TEMPLATES else value
