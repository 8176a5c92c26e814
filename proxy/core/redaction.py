"""Redaction applied to every stored text before it reaches the disk (database or journal).

Always on: key-shaped strings (OpenAI/Anthropic `sk-...` keys, `Bearer` tokens, AWS, Google,
GitHub, Slack keys, JWTs) become `[REDACTED:secret]`. Optional PII kinds, chosen per deployment
(`--redact-pii email,phone,card`): e-mail addresses, phone numbers (found by Google's
libphonenumber, `phonenumbers` package, for the configured default region) and payment card
numbers (13-19 digits passing the Luhn check). Masks keep JSON valid: they contain no quote or
backslash, so a masked JSON text still parses and the dashboard shows where masking happened.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

SECRET_MASK = "[REDACTED:secret]"
PII_KINDS = ("email", "phone", "card")

_SECRET_PATTERNS = (
    r"\bsk-[A-Za-z0-9_\-]{16,}",  # OpenAI (sk-, sk-proj-), Anthropic (sk-ant-), many others
    r"\b[Bb](?i:earer)\s+[A-Za-z0-9._~+/\-]{16,}=*",
    r"\bAKIA[0-9A-Z]{16}\b",  # AWS access key id
    r"\bAIza[0-9A-Za-z_\-]{35}",  # Google API key
    r"\bgh[pousr]_[A-Za-z0-9]{36,}",  # GitHub tokens
    r"\bxox[abprs]-[A-Za-z0-9\-]{10,}",  # Slack tokens
    r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",  # JWT
)
_SECRETS = re.compile("|".join(f"(?:{p})" for p in _SECRET_PATTERNS))
_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
_CARD_CANDIDATE = re.compile(r"(?<![\d])(?:\d[ \-]?){12,18}\d(?![\d])")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a digit string (payment card numbers pass it)."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


# Every secret pattern starts with one of these ("bearer" in any case): a text with none of
# them, nearly every text, skips the regex, whose leading `\b` defeats re's prefix scan.
_SECRET_HINTS = ("sk-", "AKIA", "AIza", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "xox", "eyJ")


def _may_hold_secret(text: str) -> bool:
    return any(hint in text for hint in _SECRET_HINTS) or "bearer" in text.lower()


def mask_secrets(text: str) -> str:
    """`text` with every key-shaped string replaced by `[REDACTED:secret]`."""
    if not _may_hold_secret(text):
        return text
    return _SECRETS.sub(SECRET_MASK, text)


def _mask_cards(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", match.group(0))
        return (
            "[REDACTED:card]" if 13 <= len(digits) <= 19 and luhn_valid(digits) else match.group(0)
        )

    return _CARD_CANDIDATE.sub(replace, text)


def _phone_masker(region: str) -> Callable[[str], str]:
    import phonenumbers

    def mask(text: str) -> str:
        if not any(c.isdigit() for c in text):
            return text
        spans = [(m.start, m.end) for m in phonenumbers.PhoneNumberMatcher(text, region)]
        for start, end in reversed(spans):
            text = text[:start] + "[REDACTED:phone]" + text[end:]
        return text

    return mask


class Redactor:
    """Masks secrets (always) and the configured PII kinds in stored texts.

    pii: kinds among `PII_KINDS`; phone_region: ISO country code for numbers without a `+`
    prefix. Raises ValueError for an unknown kind.
    """

    def __init__(self, pii: Iterable[str] = (), phone_region: str = "US") -> None:
        kinds = [k.strip().lower() for k in pii if k.strip()]
        unknown = sorted(set(kinds) - set(PII_KINDS))
        if unknown:
            raise ValueError(f"unknown PII kinds {unknown}; choose from {', '.join(PII_KINDS)}")
        steps: list[Callable[[str], str]] = [mask_secrets]
        if "card" in kinds:  # before phone: a card number can look like a phone number
            steps.append(_mask_cards)
        if "email" in kinds:
            steps.append(lambda text: _EMAIL.sub("[REDACTED:email]", text))
        if "phone" in kinds:
            steps.append(_phone_masker(phone_region.upper()))
        self._steps = steps
        self._pii = bool(kinds)
        self.kinds = tuple(kinds)

    def __call__(self, text: str | None) -> str | None:
        """The redacted plain text (None stays None); lone surrogates become U+FFFD."""
        if not text:
            return text
        text = storable(text)
        for step in self._steps:
            text = step(text)
        return text

    def json_text(self, text: str | None) -> str | None:
        """Redact a JSON document's string values (and keys); return it unchanged when nothing
        was masked, else re-serialized. Text that is not JSON is redacted as plain text.

        Masking values, not the text, matters: in JSON text an escape (`\\n`, `\\u00e9`) sits
        right before the secret, and numbers outside strings must never be touched.
        """
        if not text:
            return text
        if not self._pii:
            if not _may_hold_secret(text) and "\\ud" not in text.lower():
                return text  # no key-shaped string, no escaped lone surrogate: nothing to do
            if "\\" not in text:
                return self(text)  # no escapes: the text is the values
        try:
            document = json.loads(text)
        except (ValueError, RecursionError):
            return self(text)
        changed = False

        def walk(value: Any, depth: int) -> Any:
            nonlocal changed
            if isinstance(value, str):
                masked = self(value)
                if masked != value:
                    changed = True
                return masked
            if depth > _MAX_DEPTH:
                return value
            if isinstance(value, list):
                return [walk(item, depth + 1) for item in value]
            if isinstance(value, dict):
                return {walk(k, depth + 1): walk(v, depth + 1) for k, v in value.items()}
            return value

        redacted = walk(document, 0)
        return json.dumps(redacted, ensure_ascii=False) if changed else text


_MAX_DEPTH = 200
_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(text: str) -> str:
    """`text` with lone surrogates (half an emoji a client cut) replaced by U+FFFD, so it can be
    encoded as UTF-8 by any database driver and page."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text
