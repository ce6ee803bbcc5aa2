"""What the product's self-contained pages (``/clinician``, ``/sponsor``) send with their HTML:
a Content-Security-Policy that lets only the page's own inline script and style run (by hash)
and talk to this origin only, and headers that keep the page out of caches and referrers."""

from __future__ import annotations

import base64
import hashlib


def sha256_source(text: str) -> str:
    """A CSP source naming ``text`` by its SHA-256 (an inline script or style)."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def content_security_policy(script: str, style: str, img_src: str = "'self'") -> str:
    """The policy for a page whose only script and style are ``script`` and ``style``."""
    return "; ".join(
        (
            "default-src 'none'",
            f"script-src {sha256_source(script)}",
            f"style-src {sha256_source(style)}",
            "connect-src 'self'",
            f"img-src {img_src}",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


def page_headers(policy: str) -> dict[str, str]:
    """The response headers of a page under ``policy``."""
    return {
        "Content-Security-Policy": policy,
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    }


__all__ = ["content_security_policy", "page_headers", "sha256_source"]
