"""Prompts to token ids, one way for the offline API, the generate CLI and the server."""
from __future__ import annotations

from typing import Any


def encode_prompt(tokenizer, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
    """Text through the tokenizer (with its BOS, as vLLM does); token ids as they are."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    return list(prompt)


def render_chat(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """A conversation through the tokenizer's chat template; ValueError if it has none or fails."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use completions")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **(template_kwargs or {}))
    except Exception as e:  # jinja errors, the template's raise_exception, clashing kwargs
        raise ValueError(f"the chat template failed on these messages: {e}") from e
    return encode_prompt(tokenizer, text, add_special_tokens=False)  # the template wrote the special tokens
