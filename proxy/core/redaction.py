"""Redaction applied to every stored text before it reaches the disk (database or journal).

Always on: key-shaped strings become `[REDACTED:secret]`: the patterns of detect-secrets' plugins
(a maintained ruleset: AWS, Azure, GitHub, GitLab, Slack, Stripe, Twilio, JWT, private keys, ...)
plus what it lacks (OpenAI/Anthropic `sk-` keys, `Bearer` tokens of any length, AWS secret
access keys after their name, GitHub fine-grained `github_pat_` tokens, Google keys). JSON texts
are masked in their decoded values, so `\\u` escapes hide nothing. A fast pre-check skips a
pattern only when none of the literals every match of it must hold is in the text (all of them
looked for in one pass, by an Aho-Corasick automaton: `ahocorasick-rs`).

Optional PII kinds, chosen per deployment (`--redact-pii email,phone,card`): e-mail addresses, phone numbers (found by Google's
libphonenumber, `phonenumbers` package, for the configured default region) and payment card
numbers (13-19 digits passing the Luhn check). Masks keep JSON valid: they contain no quote or
backslash, so a masked JSON text still parses and the dashboard shows where masking happened.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from re import _constants as _c  # type: ignore[attr-defined]  # re's own regex parser
from re import _parser  # type: ignore[attr-defined]
from typing import Any

import orjson
from ahocorasick_rs import AhoCorasick

from proxy.core.memo import SizedMemo

SECRET_MASK = "[REDACTED:secret]"
MAX_PARTS = 4096
"""Most array elements `Redactor.document_json` looks at one by one."""
PII_KINDS = ("email", "phone", "card")

# What the maintained ruleset (detect-secrets' plugins) lacks or finds only in one spelling; each
# replaces the whole match, or its group 1 when it has one (the context stays readable).
_EXTRA_PATTERNS = (
    # A private key block, body included (the plugin finds only its first line).
    r"-----BEGIN[A-Z ]{0,30}PRIVATE KEY(?: BLOCK)?-----[\s\S]*?(?:-----END[A-Z ]{0,30}PRIVATE KEY(?: BLOCK)?-----|$)",
    r"\bsk-[A-Za-z0-9_\-]{16,}",  # OpenAI (sk-, sk-proj-), Anthropic (sk-ant-), many others
    r"\b[Bb](?i:earer)\s+[A-Za-z0-9._~+/\-]{8,}=*",  # Bearer tokens, short ones too
    r"\b[Bb](?i:earer)\s+(?=[A-Za-z._~+/\-]*[0-9])[A-Za-z0-9._~+/\-]+=*",  # ... with a digit
    # AWS secret access key after its name, quoted or not.
    r"(?i:aws_?secret(?:_?access)?_?key)[\s\"':=]{1,6}([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])",
    r"\bAIza[0-9A-Za-z_\-]{35}",  # Google API key
    r"\bgithub_pat_[A-Za-z0-9_]{22,}",  # GitHub fine-grained tokens
    r"\bgh[pousr]_[A-Za-z0-9]{36,}",  # GitHub tokens (any length beyond 36)
    r"\bxox[abeprso]-[A-Za-z0-9\-]{10,}",  # Slack tokens (any shape)
    r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",  # JWT
)
# detect-secrets plugins left out: not secrets (public IPs); no pattern (keyword and entropy
# heuristics, which would mask ordinary words and hashes in training data); vendor keyword
# heuristics that match `key: <any 44 characters>` in prose and cost 50-100 us a text each.
_SKIPPED_PLUGINS = frozenset(
    {
        "IPPublicDetector",
        "KeywordDetector",
        "CloudantDetector",
        "IbmCloudIamDetector",
        "IbmCosHmacDetector",
        "SoftlayerDetector",
    }
)


@dataclass(frozen=True, eq=False)
class _Rule:
    """One secret pattern and its pre-check: `hints`, literals of which every match holds one
    (lower-cased when `fold`: compare with the lower-cased text); empty: always run. A pattern
    whose hints are too short to tell (one or two characters) is searched for itself: in the
    text's long runs of token characters only when `in_runs` (every match of it is such a
    run, at least `_RUN_MIN` long), else in the whole text."""

    pattern: re.Pattern[str]
    hints: tuple[str, ...]
    fold: bool
    in_runs: bool = False

    @functools.cached_property
    def hint_set(self) -> frozenset[str]:
        return frozenset(self.hints)

    @functools.cached_property
    def weak(self) -> bool:
        """Its hints are too short to tell (one or two characters)."""
        return bool(self.hints) and min(map(len, self.hints)) <= 2


# Characters of the tokens secrets are made of (a superset of every class `in_runs` allows).
_TOKEN_CHARS = re.compile(r"[\w\-+/=.:~]")
_RUN_MIN = 24
# Every ASCII character that is not a token character becomes a space (others are kept: a
# superset of the token characters, so every match still lies within one run).
_NOT_TOKEN = {c: " " for c in range(128) if not _TOKEN_CHARS.match(chr(c))}


def _token_only(items: Any) -> bool:
    """Whether every character the parsed regex `items` can match is a token character
    (zero-width assertions allowed: at a run's edge they see a space, as they would see the
    non-token character beside the run)."""
    for op, av in items:
        if op is _c.LITERAL:
            if not _TOKEN_CHARS.match(chr(av)):
                return False
        elif op is _c.IN:
            for member_op, member in av:
                if member_op is _c.LITERAL:
                    if not _TOKEN_CHARS.match(chr(member)):
                        return False
                elif member_op is _c.RANGE:
                    if not all(_TOKEN_CHARS.match(chr(c)) for c in range(member[0], member[1] + 1)):
                        return False
                elif member_op is _c.CATEGORY:
                    if member not in (_c.CATEGORY_DIGIT, _c.CATEGORY_WORD):
                        return False
                else:
                    return False
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            if not _token_only(av[2]):
                return False
        elif op is _c.SUBPATTERN:
            if not _token_only(av[-1]):
                return False
        elif op is _c.BRANCH:
            if not all(_token_only(alternative) for alternative in av[1]):
                return False
        elif op not in (_c.AT, _c.ASSERT, _c.ASSERT_NOT):
            return False
    return True


def _required(items: Any) -> list[str] | None:
    """Literals of which every match of the parsed regex `items` holds at least one (None: no
    such set found). Sound by construction: only literals outside optional parts are used, a
    branch counts only when each alternative has its own, and runs break at `"` and `\\`
    (which JSON text may escape)."""
    best: list[str] | None = None

    def better(candidate: list[str] | None) -> None:
        nonlocal best
        if (
            candidate
            and all(candidate)
            and (best is None or min(map(len, candidate)) > min(map(len, best)))
        ):
            best = candidate

    run = ""
    for op, av in items:
        if op is _c.LITERAL and chr(av) not in '"\\' and chr(av) >= " ":
            run += chr(av)
            continue
        better([run])
        run = ""
        if op is _c.SUBPATTERN:
            better(_required(av[-1]))
        elif op is _c.BRANCH:
            alternatives = [_required(a) for a in av[1]]
            if all(alternatives):
                better(sorted({h for a in alternatives for h in a or []}))
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT) and av[0] >= 1:
            better(_required(av[2]))
    better([run])
    return best


def _rule(pattern: re.Pattern[str]) -> _Rule:
    parsed = _parser.parse(pattern.pattern, pattern.flags)
    fold = bool(pattern.flags & re.IGNORECASE) or "(?i" in pattern.pattern
    hints = _required(parsed) or []
    in_runs = _token_only(parsed) and parsed.getwidth()[0] >= _RUN_MIN
    return _Rule(pattern, tuple(h.lower() for h in hints) if fold else tuple(hints), fold, in_runs)


@functools.cache
def secret_rules() -> tuple[_Rule, ...]:
    """The secret patterns: ours (`_EXTRA_PATTERNS`) first, then every detect-secrets plugin's
    denylist (AWS, Azure, GitHub, GitLab, Slack, Stripe, Twilio, SendGrid, npm, PyPI, JWT,
    private keys, basic-auth URLs, ...), each with its pre-check. Built on first use."""
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    patterns = [re.compile(p) for p in _EXTRA_PATTERNS]
    plugin: Any
    for plugin in get_mapping_from_secret_type_to_class().values():
        if plugin.__name__ in _SKIPPED_PLUGINS:
            continue
        patterns.extend(getattr(plugin, "denylist", None) or ())
    return tuple(_rule(p) for p in patterns)


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


@functools.cache
def _hints() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Every distinct hint: case-sensitive ones, and lower-cased ones (for the lower-cased
    text)."""
    rules = [r for r in secret_rules() if not (r.weak and r.in_runs)]  # those: by their runs
    return (
        tuple(sorted({h for r in rules if not r.fold for h in r.hints})),
        tuple(sorted({h for r in rules if r.fold for h in r.hints})),
    )


@dataclass(frozen=True, eq=False)
class _HintIndex:
    """The pre-check's tables, built once: an Aho-Corasick automaton for the case-sensitive
    hints (all found in one pass over the text instead of one substring scan each; the few
    lower-cased hints are scanned for, which measured faster than their own automaton over
    lower-cased text), which rules each hint enables (positions in `secret_rules()`), the rules
    that always run (no hints) and the rules tried on the text's long runs (`_Rule.in_runs`
    with weak hints)."""

    exact: tuple[str, ...]
    folded: tuple[str, ...]
    exact_automaton: AhoCorasick | None
    rules_of_hint: dict[str, tuple[int, ...]]
    always: tuple[int, ...]
    by_runs: tuple[int, ...]


@functools.cache
def _hint_index() -> _HintIndex:
    exact, folded = _hints()
    rules_of_hint: dict[str, list[int]] = {}
    always, by_runs = [], []
    for position, rule in enumerate(secret_rules()):
        if rule.weak and rule.in_runs:
            by_runs.append(position)
        elif not rule.hints:
            always.append(position)
        else:
            for hint in rule.hint_set:
                rules_of_hint.setdefault(hint, []).append(position)
    return _HintIndex(
        exact,
        folded,
        AhoCorasick(list(exact)) if exact else None,
        {hint: tuple(positions) for hint, positions in rules_of_hint.items()},
        tuple(always),
        tuple(by_runs),
    )


def _found(automaton: AhoCorasick | None, hints: tuple[str, ...], text: str) -> set[str]:
    """The `hints` that occur in `text` (overlapping occurrences count: exact, like `in`)."""
    if automaton is None:
        return set()
    try:
        matches = automaton.find_matches_as_indexes(text, overlapping=True)
    except UnicodeEncodeError:  # a lone surrogate: the automaton takes UTF-8 only
        return {h for h in hints if h in text}
    return {hints[index] for index, _, _ in matches}


def _present_hints(text: str) -> set[str]:
    """The hints that occur in `text`: case-sensitive ones in it, lower-cased ones in its
    lower-cased form."""
    index = _hint_index()
    present = _found(index.exact_automaton, index.exact, text)
    if index.folded:
        lowered = text.lower()
        present.update(h for h in index.folded if h in lowered)
    return present


# `_NOT_TOKEN` for ASCII bytes (`bytes.translate` is several times faster than `str.translate`).
_NOT_TOKEN_BYTES = bytes(32 if c in _NOT_TOKEN else c for c in range(256))


def _long_runs(text: str) -> str:
    """The runs of token characters of `text` at least `_RUN_MIN` long, space-separated."""
    if text.isascii():
        words = text.encode("ascii").translate(_NOT_TOKEN_BYTES).split()
        if not words or max(map(len, words)) < _RUN_MIN:
            return ""
        return b" ".join([word for word in words if len(word) >= _RUN_MIN]).decode("ascii")
    words_str = text.translate(_NOT_TOKEN).split()
    return " ".join([word for word in words_str if len(word) >= _RUN_MIN])


def _active_rules(text: str) -> tuple[_Rule, ...]:
    """The rules that may match somewhere in `text` (the others' hints are all absent)."""
    index = _hint_index()
    present = _present_hints(text)
    candidates = set(index.always)
    for hint in present:
        candidates.update(index.rules_of_hint.get(hint, ()))
    runs = _long_runs(text) if index.by_runs else ""
    if runs:
        candidates.update(index.by_runs)
    if not candidates:
        return ()
    rules = secret_rules()
    active = []
    for position in sorted(candidates):
        rule = rules[position]
        if rule.weak and rule.in_runs:
            if rule.pattern.search(runs) is None:
                continue
        elif rule.weak and rule.pattern.search(text) is None:
            continue
        active.append(rule)
    return tuple(active)


def _mask(match: re.Match[str]) -> str:
    if match.re.groups and match.group(1) is not None:
        whole, (start, end) = match.group(0), match.span(1)
        offset = match.start(0)
        return whole[: start - offset] + SECRET_MASK + whole[end - offset :]
    return SECRET_MASK


def mask_secrets(text: str, rules: tuple[_Rule, ...] | None = None) -> str:
    """`text` with every key-shaped string replaced by `[REDACTED:secret]` (see `secret_rules`;
    for patterns that name the secret after a keyword, only the secret is replaced). `rules`:
    the rules to try (default: those whose hints are in `text`)."""
    for rule in _active_rules(text) if rules is None else rules:
        text = rule.pattern.sub(_mask, text)
    return text


def redact_identifier(value: str) -> str:
    """An identifier a client chose (a trajectory id) with each key-shaped part replaced by
    `[REDACTED:<12 hex digits of its SHA-256>]`: stable, so every request of one trajectory
    still gets the same id, yet the secret is never stored or echoed. Printable ASCII stays
    printable ASCII."""

    def digest(match: re.Match[str]) -> str:
        return f"[REDACTED:{hashlib.sha256(match.group(0).encode()).hexdigest()[:12]}]"

    for rule in _active_rules(value):
        value = rule.pattern.sub(digest, value)
    return value


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

    CLEAN_CACHE_BYTES = 8 << 20
    """Most bytes of JSON kept of parts found clean (`document_json`)."""

    def __init__(self, pii: Iterable[str] = (), phone_region: str = "US") -> None:
        kinds = [k.strip().lower() for k in pii if k.strip()]
        unknown = sorted(set(kinds) - set(PII_KINDS))
        if unknown:
            raise ValueError(f"unknown PII kinds {unknown}; choose from {', '.join(PII_KINDS)}")
        steps: list[Callable[[str], str]] = []
        if "card" in kinds:  # before phone: a card number can look like a phone number
            steps.append(_mask_cards)
        if "email" in kinds:
            steps.append(lambda text: _EMAIL.sub("[REDACTED:email]", text))
        if "phone" in kinds:
            steps.append(_phone_masker(phone_region.upper()))
        self._steps = steps
        self._pii = bool(kinds)
        self.kinds = tuple(kinds)
        # The rules and the pre-check's tables, built here rather than by the first call (the
        # proxy builds its Redactor at start-up, before it freezes the start-up heap).
        _hint_index()
        # Compact JSON (orjson) of parts found to hold nothing to mask.
        self._clean: SizedMemo[bytes, bool] = SizedMemo(self.CLEAN_CACHE_BYTES)
        self.scanned_bytes = 0
        """Bytes of JSON text `document_json` has looked at (not counting the parts it knew)."""

    def __call__(self, text: str | None) -> str | None:
        """The redacted plain text (None stays None); lone surrogates become U+FFFD."""
        return self._value(text, None)

    def _value(self, text: str | None, rules: tuple[_Rule, ...] | None) -> str | None:
        if not text:
            return text
        text = mask_secrets(storable(text), rules)
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
        rules: tuple[_Rule, ...] | None = None  # None: each value picks its own
        if "\\u" not in text:
            # Only a backslash-u escape can hide a letter or digit of a secret in JSON text (and
            # an escaped slash, a slash): without one, the rules whose hints are in the text are
            # the only ones that can match any of its values.
            rules = _active_rules(_unescaped(text) if "\\" in text else text)
            if not rules and not self._pii:
                return text
        try:
            document = json.loads(text)
        except (ValueError, RecursionError):
            return self(text)
        changed = False

        def walk(value: Any, depth: int) -> Any:
            nonlocal changed
            if isinstance(value, str):
                masked = self._value(value, rules)
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

    def document_json(self, text: str | None, document: Any) -> str | None:
        """`json_text(text)` for a JSON text whose parsed value is `document`, without looking
        again at a part it found clean before.

        The parts of an object are the elements of each of its arrays (chat `messages` and
        `tools`, Responses `input` items) and, together, everything else (its keys and other
        values). An agent resends its whole history at every step, so each message is looked at
        once, not once per step: a request costs what its new messages cost. When every part is
        clean, so is the text (each string value lies within one part and is masked on its own),
        and it is returned unchanged; otherwise the text is redacted whole. `document` must be
        `json.loads(text)`; any other value is redacted whole too, and so is an object whose
        arrays hold more than MAX_PARTS elements in all (a body no agent sends, where a lookup
        per element would cost more than the text's scan).
        """
        if (
            not text
            or not isinstance(document, dict)
            or sum(len(v) for v in document.values() if isinstance(v, list)) > MAX_PARTS
        ):
            self.scanned_bytes += len(text or "")
            return self.json_text(text)
        rest: dict[str, Any] = {}
        for key, value in document.items():
            if isinstance(value, list):
                rest[key] = None  # the key still counts
                for item in value:
                    if not self._known_clean(item):
                        return self._whole(text)
            else:
                rest[key] = value
        return text if self._known_clean(rest) else self._whole(text)

    def _whole(self, text: str) -> str | None:
        self.scanned_bytes += len(text)
        return self.json_text(text)

    def _known_clean(self, value: Any) -> bool:
        """Whether `value` holds nothing to mask (remembered by its compact JSON when so)."""
        try:
            key = orjson.dumps(value)
        except TypeError:  # a lone surrogate, an integer beyond 64 bits: looked at whole
            return False
        if self._clean.get(key):
            return True
        part = key.decode("utf-8")
        self.scanned_bytes += len(part)
        if self.json_text(part) != part:
            return False
        self._clean.put(key, True, len(key))
        return True


_MAX_DEPTH = 200


def _unescaped(text: str) -> str:
    """JSON text with its two-character escapes replaced by what they stand for (control
    characters by a space): every match in a decoded value also matches here."""
    text = text.replace("\\\\", "\0")  # an escaped backslash is not the start of an escape
    for escape, char in _ESCAPES:
        if escape in text:
            text = text.replace(escape, char)
    return text.replace("\0", "\\")


_ESCAPES = (
    ("\\n", " "),
    ("\\r", " "),
    ("\\t", " "),
    ("\\b", " "),
    ("\\f", " "),
    ('\\"', '"'),
    ("\\/", "/"),
)


_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(text: str) -> str:
    """`text` with lone surrogates (half an emoji a client cut) replaced by U+FFFD, so it can be
    encoded as UTF-8 by any database driver and page."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def loggable_error(exc: BaseException) -> str:
    """One line describing `exc` that is safe to log: its type and the first line of the
    driver's own message (for a SQLAlchemy error, the DBAPI error's, without the statement,
    its parameters or a `DETAIL` line that quotes row values), key-shaped strings masked.
    E.g. "OperationalError: database is locked"."""
    orig = getattr(exc, "orig", None)
    inner = orig if isinstance(orig, BaseException) else exc
    lines = str(inner).strip().splitlines()
    first = lines[0] if lines else ""
    if "[SQL:" in first:
        first = first.split("[SQL:", 1)[0].strip()
    first = first[:300]
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return mask_secrets(storable(text))
