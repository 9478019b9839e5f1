"""Chat data: a conversation rendered through a chat template into text
segments, each marked as an assistant turn (trained on) or not (context only).

The template is the tokenizer's own (``chat_template`` in a
``tokenizer_config.json`` next to its tokenizer.json), else ``CHAT_TEMPLATE``.
Segments come from rendering growing prefixes of the conversation: the text
that the assistant message i adds after ``render(messages[:i],
add_generation_prompt=True)`` is its turn (HF's ``{% generation %}`` blocks
and litgpt's prompt/response split draw the same line).
"""

from __future__ import annotations

import json
from pathlib import Path

from scaletrain.errors import UserError

# Where a tokenizer has no chat template: each message as "<|role|>\ncontent\n",
# then "<|assistant|>\n" to prompt the reply. The same template is written into
# every HF export, so `transformers serve` renders it alike.
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def render_default_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """``CHAT_TEMPLATE`` rendered without Jinja."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text


def render_chat(messages: list[dict], template: str | None, add_generation_prompt: bool = True) -> str:
    if template is None or template == CHAT_TEMPLATE:
        return render_default_chat(messages, add_generation_prompt)
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def tokenizer_chat_template(tokenizer_path: Path | None) -> str | None:
    """The chat template in tokenizer_config.json beside a tokenizer.json, if any."""
    if tokenizer_path is None:
        return None
    config = tokenizer_path.parent / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = json.loads(config.read_text()).get("chat_template")
    return template if isinstance(template, str) else None


def chat_segments(messages: list[dict], template: str | None) -> list[tuple[str, bool]]:
    """-> [(text, is_assistant_turn)], concatenating to the whole rendered chat."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render_chat(messages[:i], template, add_generation_prompt=True)
            segments.append((_suffix(done, prompt, template), False))
            done = prompt
        through = render_chat(messages[: i + 1], template, add_generation_prompt=False)
        segments.append((_suffix(done, through, template), message["role"] == "assistant"))
        done = through
    return [(text, train) for text, train in segments if text]


def _suffix(prefix: str, text: str, template: str | None) -> str:
    if not text.startswith(prefix):
        raise UserError("the tokenizer's chat template renders a conversation differently from its "
                        "beginning, so assistant turns cannot be located; use a tokenizer without "
                        "chat_template (scaletrain's default) or a prefix-stable template")
    return text[len(prefix):]
