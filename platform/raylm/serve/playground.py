"""The playground page (`GET /` of every app) and the headers it is served with."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

PLAYGROUND = Path(__file__).with_name("playground.html")


def playground_page() -> tuple[str, dict[str, str]]:
    """The playground and its headers. The page keeps the user's API key in localStorage, so its
    Content-Security-Policy runs only the page's own script (by its SHA-256: no injected markup's
    script or event handler runs), lets it talk only to this origin (nothing can carry the key
    elsewhere) and keeps other sites from framing it."""
    page = PLAYGROUND.read_text(encoding="utf-8")
    scripts = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                       for s in re.findall(r"<script>(.*?)</script>", page, re.S))
    csp = (f"default-src 'none'; script-src {scripts}; style-src 'unsafe-inline'; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page, {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                  "Referrer-Policy": "no-referrer"}
