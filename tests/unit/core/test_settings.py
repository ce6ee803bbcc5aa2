"""The product-wide settings' checks of their own (the tree's are in tests/unit/concierge)."""

from __future__ import annotations

from pathlib import Path

from core.settings import Settings


def test_development_keys_are_named_until_each_is_set(tmp_path: Path) -> None:
    """The API warns with this list at start: every key still at its public default."""
    assert Settings(home=tmp_path).development_keys() == [
        "CONCIERGE_PSEUDONYM_KEY",
        "CONCIERGE_TOKEN_KEY",
        "CONCIERGE_AUDIT_KEY",
    ]
    assert Settings(home=tmp_path, pseudonym_key="p" * 40).development_keys() == [
        "CONCIERGE_TOKEN_KEY",
        "CONCIERGE_AUDIT_KEY",
    ]
    own = Settings(
        home=tmp_path,
        pseudonym_key="p" * 40,
        token_keys="new=" + "n" * 40,
        audit_key="a" * 40,
    )
    assert own.development_keys() == []
    # the development token key still listed beside a new one is still a development key
    rotating = Settings(
        home=tmp_path,
        token_keys="new=" + "n" * 40 + ",old=" + "change-me-this-is-a-development-token-key",
    )
    assert "CONCIERGE_TOKEN_KEY" in rotating.development_keys()
