"""PII and secret redaction: each match is replaced by a typed placeholder (`<EMAIL>`, ...).

Patterns are tight and validated where a checksum or a parser exists, so ordinary text is not
redacted by accident: credit-card numbers must pass the Luhn check, IBANs the ISO 13616 mod-97
check, IP addresses Python's `ipaddress` parser, and phone numbers Google's libphonenumber
(`phonenumbers`) for the configured region. Secrets go first (a key may contain digits that look
like a phone number), phone numbers last.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from typing import Callable

import pyarrow as pa

from raylm.data.config import PiiStep

PLACEHOLDER = {
    "email": "<EMAIL>", "phone": "<PHONE>", "ipv4": "<IPV4>", "ipv6": "<IPV6>",
    "credit_card": "<CREDIT_CARD>", "iban": "<IBAN>", "aws_access_key": "<AWS_ACCESS_KEY>",
    "github_token": "<GITHUB_TOKEN>", "slack_token": "<SLACK_TOKEN>", "google_api_key": "<GOOGLE_API_KEY>",
    "private_key": "<PRIVATE_KEY>", "bearer_token": "<BEARER_TOKEN>", "jwt": "<JWT>",
}


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    s = iban.replace(" ", "").upper()
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _ip_ok(kind: str) -> Callable[[str], bool]:
    cls = ipaddress.IPv4Address if kind == "ipv4" else ipaddress.IPv6Address

    def ok(s: str) -> bool:
        try:
            cls(s)
        except ValueError:
            return False
        return True

    return ok


# kind -> (pattern, validator of the matched text or None, group to replace)
_PATTERNS: list[tuple[str, re.Pattern, Callable[[str], bool] | None, int]] = [
    ("private_key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
     None, 0),
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}"), None, 0),
    ("bearer_token", re.compile(r"(?i)\bbearer\s+([A-Za-z0-9\-._~+/]{16,}=*)"), None, 1),
    ("aws_access_key", re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b"), None, 0),
    ("github_token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b"), None, 0),
    ("slack_token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), None, 0),
    ("google_api_key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"), None, 0),
    ("email", re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b"), None, 0),
    ("iban", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"), iban_ok, 0),
    ("credit_card", re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])"),
     lambda s: luhn_ok(re.sub(r"\D", "", s)), 0),
    ("ipv6", re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|:)(?![\w:])"), _ip_ok("ipv6"), 0),
    ("ipv4", re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])"), _ip_ok("ipv4"), 0),
]


def redact(text: str, kinds: set[str], phone_region: str = "US") -> tuple[str, Counter]:
    """`text` with every enabled kind replaced by its placeholder, and the count per kind."""
    counts: Counter = Counter()
    for kind, pattern, valid, group in _PATTERNS:
        if kind not in kinds:
            continue

        def sub(m: re.Match, kind=kind, valid=valid, group=group) -> str:
            if valid is not None and not valid(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            if group:
                return m.group(0)[: m.start(group) - m.start(0)] + PLACEHOLDER[kind]
            return PLACEHOLDER[kind]

        text = pattern.sub(sub, text)
    if "phone" in kinds and any(c.isdigit() for c in text):
        import phonenumbers

        out, last = [], 0
        for m in phonenumbers.PhoneNumberMatcher(text, phone_region):
            out.append(text[last:m.start])
            out.append(PLACEHOLDER["phone"])
            last = m.end
            counts["phone"] += 1
        if out:
            text = "".join(out) + text[last:]
    return text, counts


def count_column(kind: str) -> str:
    return f"_pii_{kind}"


def redact_column(table: pa.Table, cfg: PiiStep) -> pa.Table:
    kinds = set(cfg.kinds)
    texts, per_kind = [], {k: [] for k in cfg.kinds}
    for text in table.column("text").to_pylist():
        new, counts = redact(text, kinds, cfg.phone_region)
        texts.append(new)
        for k in cfg.kinds:
            per_kind[k].append(counts.get(k, 0))
    table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    for k in cfg.kinds:
        table = table.append_column(count_column(k), pa.array(per_kind[k], pa.int64()))
    return table
