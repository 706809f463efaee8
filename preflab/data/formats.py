"""Preference rows in the formats TRL accepts, validated and brought to one shape.

Accepted rows (extra columns are kept in ``Example.extra``):

- standard: ``{"prompt": str, "chosen": str, "rejected": str}``;
- conversational: prompt, chosen and rejected as lists of ``{"role", "content"}`` messages (the
  responses usually one assistant message); a string part beside message lists is wrapped as one message;
- implicit prompt: no ``prompt``; ``chosen`` and ``rejected`` are full conversations (or strings) that
  share a prefix, which becomes the prompt.

Every problem raises :class:`RowError` naming the row and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant", "tool")
Messages = list[dict]


class RowError(ValueError):
    def __init__(self, where: str, field_: str, message: str, kind: str = "malformed"):
        super().__init__(f"{where}: field {field_!r}: {message}")
        self.where, self.field, self.kind = where, field_, kind


@dataclass(frozen=True)
class Example:
    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages
    where: str
    extra: dict = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


def _check_messages(value, where: str, name: str) -> Messages:
    if not isinstance(value, list):
        raise RowError(where, name, f"expected a string or a list of messages, got {type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowError(where, f"{name}[{i}]", f"expected a {{role, content}} object, got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise RowError(where, f"{name}[{i}].role", f"expected one of {list(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise RowError(where, f"{name}[{i}].content", f"expected a string, got {type(m.get('content')).__name__}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _part(data: dict, name: str, where: str, role: str, conversational: bool):
    value = data[name]
    if isinstance(value, str):
        return [{"role": role, "content": value}] if conversational else value
    return _check_messages(value, where, name)


def _is_empty(response) -> bool:
    if isinstance(response, str):
        return not response.strip()
    return not response or all(not m["content"].strip() for m in response)


def _split_implicit(chosen, rejected, where: str):
    """The shared prefix of two full conversations (or texts) as the prompt, and the two remainders."""
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise RowError(where, "prompt", "missing, and chosen/rejected share no leading messages to take it from")
        return chosen[:n], chosen[n:], rejected[n:]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # end the prompt at a word boundary, before the whitespace: the response starts with it (" four."), as a
    # tokenizer joins a word to the space before it (TRL ends the prompt there too)
    n = max(chosen.rfind(" ", 0, n), chosen.rfind("\n", 0, n)) + 1
    while n > 0 and chosen[n - 1].isspace():
        n -= 1
    if n == 0:
        raise RowError(where, "prompt", "missing, and chosen/rejected share no leading text to take it from")
    return chosen[:n], chosen[n:], rejected[n:]


def normalize_row(data: dict, where: str) -> Example:
    """Validate one row and return it as an :class:`Example`; raises :class:`RowError`."""
    for name in ("chosen", "rejected"):
        if name not in data or data[name] is None:
            raise RowError(where, name, "missing")
    has_prompt = data.get("prompt") is not None
    parts = [data[k] for k in ("prompt", "chosen", "rejected") if k in data and data[k] is not None]
    for name in ("prompt", "chosen", "rejected"):
        if name in data and data[name] is not None and not isinstance(data[name], (str, list)):
            raise RowError(where, name, f"expected a string or a list of messages, got {type(data[name]).__name__}")
    conversational = any(isinstance(p, list) for p in parts)
    chosen = _part(data, "chosen", where, "assistant", conversational)
    rejected = _part(data, "rejected", where, "assistant", conversational)
    if has_prompt:
        prompt = _part(data, "prompt", where, "user", conversational)
    else:
        prompt, chosen, rejected = _split_implicit(chosen, rejected, where)
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if _is_empty(response):
            raise RowError(where, name, "empty response")
    if conversational and (not prompt or (isinstance(prompt, str) and not prompt.strip())):
        raise RowError(where, "prompt", "empty prompt")
    if chosen == rejected:
        raise RowError(where, "rejected", "identical to chosen (no preference signal)", kind="identical")
    extra = {k: v for k, v in data.items() if k not in ("prompt", "chosen", "rejected")}
    return Example(prompt, chosen, rejected, where, extra)
