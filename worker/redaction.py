"""What may be recorded of a request or an error: in result.json, logs, task events, Flower.

`data:` URLs are shown by type and size, URLs without query, fragment or user info (signatures,
tokens, passwords), values under keys named like secrets not at all.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

MAX_DEPTH = 20  # levels of nesting in a request: it needs 4 (plugin options hold a few more); a request nested deeper
# is refused (worker.schema), and redaction shows no deeper. A few hundred levels of [[[...]]] (1 KB of JSON) would
# exhaust Python's stack in anything that recurses into it.
SECRET_KEY = re.compile(r"secret|token|passw|api_?key|authori[sz]ation|credential|signature", re.I)


def redacted(value: Any, depth: int = 0) -> Any:
    """A request (or any part of one) as it may be recorded: in result.json, logs, task events.

    `data:` URLs are shortened to their type and size (they can be megabytes), URLs lose their
    query, fragment and user info (signatures, tokens, passwords), and values under keys named
    like secrets are hidden, at any depth; what lies deeper than MAX_DEPTH is not shown.
    """
    if isinstance(value, dict | list | tuple) and depth >= MAX_DEPTH:
        return "<nested too deep>"
    if isinstance(value, dict):
        return {key: "<redacted>" if SECRET_KEY.search(str(key)) and value[key] is not None
                else redacted(value[key], depth + 1) for key in value}
    if isinstance(value, list | tuple):
        return [redacted(item, depth + 1) for item in value]
    if isinstance(value, str):
        return redacted_text(value)  # a reference, or a prompt that quotes one
    return value


def redacted_reference(ref: str) -> str:
    """One reference as it may be shown: `data:` URLs by size, other URLs without query or credentials (even
    a malformed one)."""
    if ref.startswith("data:"):
        return f"{ref.split(',', 1)[0][:100]},... ({len(ref)} characters)"
    if "://" not in ref:  # a prompt like "photo: a cat" is no URL
        return ref
    try:
        parts = urlsplit(ref)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        scheme, _, rest = ref.split("?", 1)[0].split("#", 1)[0].partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"
    if not parts.scheme or not ref[len(parts.scheme):].startswith("://"):  # "style: https://..." is a prompt
        return ref
    query = "?..." if parts.query or parts.fragment else ""  # e.g. redis+socket:///run/r.sock?password=...
    scheme = ref[:len(parts.scheme)]  # as written: urlsplit lower-cases it
    return f"{scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}{query}"  # no user:password@


URL_IN_TEXT = re.compile(r"\b(?:data:[\w.+/-]*[;,]|[A-Za-z][A-Za-z0-9+.-]*://)[^\s'\"<>]*")


def redacted_text(text: str) -> str:
    """Free text (an error message from a plugin or a library) with each URL in it shown as `redacted_reference`
    shows one."""
    def shown(url: re.Match) -> str:
        return url.group() if url.group().endswith(",...") else redacted_reference(url.group())  # shown already

    return URL_IN_TEXT.sub(shown, text)
