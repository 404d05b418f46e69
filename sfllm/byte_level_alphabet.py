"""GPT-2's spelling of bytes in a byte-level vocabulary, for tokenizers built and read without transformers.

Printable bytes stand for themselves and the others move to code points 256 and up, so
that no vocabulary entry holds whitespace or control characters.
"""
from __future__ import annotations

import functools


@functools.cache
def byte_characters() -> dict[int, str]:
    """Each byte's character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = {byte: chr(byte) for byte in printable}
    for byte in range(256):
        if byte not in characters:
            characters[byte] = chr(256 + len(characters) - len(printable))
    return characters


@functools.cache
def character_bytes() -> dict[str, int]:
    """Each character's byte: `byte_characters` inverted."""
    return {character: byte for byte, character in byte_characters().items()}
