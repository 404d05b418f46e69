"""The token a chat template closes each turn with, which must stop generation too.

Chat models end an assistant turn with this token, yet some configs only name the
pretraining end-of-text token as EOS, so generation would run past the turn.
"""
from __future__ import annotations

import json
from pathlib import Path

# ChatML, Llama 3, Phi-3, Gemma.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def end_of_turn_token_ids(folder: Path) -> tuple[int, ...]:
    """Ids of the known end-of-turn tokens that the folder's chat template writes."""
    templates = chat_templates(folder)
    if not templates:
        return ()
    ids_by_content = added_token_ids(folder)
    return tuple(
        ids_by_content[token]
        for token in END_OF_TURN_TOKENS
        if token in ids_by_content and any(token in template for template in templates)
    )


def chat_templates(folder: Path) -> list[str]:
    templates: list[str] = []
    jinja_path = folder / "chat_template.jinja"
    if jinja_path.is_file():
        templates.append(jinja_path.read_text())
    template = _read_json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, str):
        templates.append(template)
    elif isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        templates.extend(entry["template"] for entry in template)
    return templates


def added_token_ids(folder: Path) -> dict[str, int]:
    ids = {token["content"]: token["id"] for token in _tokenizer_json_added_tokens(folder / "tokenizer.json")}
    decoder = _read_json(folder / "tokenizer_config.json").get("added_tokens_decoder", {})
    for token_id, token in decoder.items():
        ids.setdefault(token["content"], int(token_id))
    return ids


def _tokenizer_json_added_tokens(path: Path) -> list[dict]:
    """The "added_tokens" array of tokenizer.json, decoded without the vocabulary and merges.

    Decoding the whole file takes most of a second for large vocabularies; serializers write
    "added_tokens" before "model", so its first occurrence is the top-level key.
    """
    if not path.is_file():
        return []
    text = path.read_text()
    key_at = text.find('"added_tokens"')
    if key_at < 0:
        return []
    tokens, _ = json.JSONDecoder().raw_decode(text, text.index("[", key_at))
    return tokens


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
