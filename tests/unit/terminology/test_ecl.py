"""The ECL parser: what it accepts, and errors at the right character."""

from __future__ import annotations

import pytest

from terminology.ecl import EclSyntaxError, parse, render


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("<<73211009", "<< 73211009"),
        ("<< 73211009 |Diabetes mellitus|", "<< 73211009 |Diabetes mellitus|"),
        ("<< 73211009 minus << 46635009", "<< 73211009 MINUS << 46635009"),
        ("<< 73211009 and < 404684003 AND 64572001", "<< 73211009 AND < 404684003 AND 64572001"),
        ("<<73211009,<404684003", "<< 73211009 AND < 404684003"),
        ("(<< 1234567 OR < 234567) AND *", "(<< 1234567 OR < 234567) AND *"),
        (
            "<! 123456 OR >>! 123456 or >! 123456 OR <<! 123456",
            "<! 123456 OR >>! 123456 OR >! 123456 OR <<! 123456",
        ),
        ("< (123456 OR 234567)", "< (123456 OR 234567)"),
        ("/* all */ * /* of it */", "*"),
        ("((123456))", "123456"),
    ],
)
def test_accepted(text: str, normal: str) -> None:
    assert render(parse(text)) == normal


@pytest.mark.parametrize(
    ("text", "position", "message"),
    [
        ("", 0, "the expression is empty"),
        ("   ", 3, "the expression is empty"),
        ("<< 73211009 AND < 12345678 OR 123456", 27, "OR after AND: .* needs parentheses"),
        ("123456 MINUS 234567 MINUS 345678", 20, "MINUS takes two operands"),
        ("<< 12", 3, "'12' is not a SNOMED CT id"),
        ("<< 0123456", 3, "is not a SNOMED CT id"),
        ("<< 123456 : 363698007 = 123456", 10, r"refinements \(':'\) are not supported"),
        ("<< 123456.363698007", 9, "dotted attributes"),
        ("<< 123456 {{ term = 'x' }}", 10, "filters"),
        ("^ 123456", 0, "member of"),
        ("descendantOf 123456", 0, "the long form 'descendantOf' is not supported"),
        ("(123456", 7, "expected '\\)', found the end of the expression"),
        ("123456 |abc", 7, "the term is not closed"),
        ("<< 123456 )", 10, "unexpected '\\)'"),
        ("<< 123456 AND", 13, "expected a concept id, '\\*' or '\\('"),
        ("<< < 123456", 3, "expected a concept id"),
        ("<< 123456 /* open", 10, "the comment is not closed"),
        ("<< 123456abc", 9, "unexpected 'abc'"),
    ],
)
def test_errors_carry_the_position(text: str, position: int, message: str) -> None:
    with pytest.raises(EclSyntaxError, match=message) as caught:
        parse(text)
    assert caught.value.position == position
    assert str(caught.value).startswith(f"ECL error at character {position + 1}: ")
