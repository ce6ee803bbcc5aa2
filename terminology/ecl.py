"""SNOMED CT Expression Constraint Language (ECL): parsing and evaluation over a hierarchy.

PyPI has no maintained ECL parser for Python (the ECL reference implementations are Java and
JavaScript ANTLR grammars), so this is a small recursive-descent parser for the part of ECL 2.x
that selects by the is-a hierarchy, written from the specification's ABNF:

* focus concepts: an SCTID (6 to 18 digits), optionally followed by ``|term|``; the wildcard
  ``*`` (any concept);
* constraint operators: ``<`` descendant of, ``<<`` descendant or self of, ``<!`` child of,
  ``<<!`` child or self of, ``>`` ancestor of, ``>>`` ancestor or self of, ``>!`` parent of,
  ``>>!`` parent or self of;
* compound constraints: ``AND`` (or ``,``), ``OR``, ``MINUS``, case-insensitive, with
  parentheses. As the specification requires, a constraint mixing different operators must
  be parenthesised (``A AND B OR C`` is an error), and ``MINUS`` takes exactly two operands;
* comments ``/* ... */`` anywhere whitespace may be.

Refinements (``:``), dotted attributes (``.``), member-of (``^``), cardinality, filters
(``{{ }}``) and the long-form operator names are not supported: each is a
:class:`EclSyntaxError` at its position saying so, never a silently wider or narrower set.

Errors carry ``position``, the 0-based offset of the offending character (``column`` is
1-based), so an API can point at it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .hierarchy import EMPTY, Hierarchy, Index

OPERATORS = ("<<!", ">>!", "<<", ">>", "<!", ">!", "<", ">")
#: operator -> (direction down?, include self?, one step only?)
_OPERATOR_MEANING = {
    "<": (True, False, False),
    "<<": (True, True, False),
    "<!": (True, False, True),
    "<<!": (True, True, True),
    ">": (False, False, False),
    ">>": (False, True, False),
    ">!": (False, False, True),
    ">>!": (False, True, True),
}


class EclSyntaxError(ValueError):
    """An ECL expression that does not parse, at ``position`` (0-based character offset)."""

    def __init__(self, message: str, position: int, expression: str) -> None:
        self.reason = message
        self.position = position
        self.expression = expression
        super().__init__(f"ECL error at character {position + 1}: {message}")

    @property
    def column(self) -> int:
        return self.position + 1


# --------------------------------------------------------------------------- syntax tree


@dataclass(frozen=True)
class Concept:
    """A focus concept (``sctid``), or the wildcard when ``sctid`` is None."""

    sctid: int | None
    term: str | None = None
    position: int = 0


@dataclass(frozen=True)
class Constrained:
    """A constraint operator applied to a focus concept or a parenthesised expression."""

    operator: str | None
    operand: Concept | Compound | Constrained


@dataclass(frozen=True)
class Compound:
    """``AND``, ``OR`` or ``MINUS`` over two or more operands (``MINUS``: exactly two)."""

    conjunction: str  # "AND", "OR", "MINUS"
    operands: tuple[Expression, ...] = field(default_factory=tuple)


Expression = Concept | Constrained | Compound


# --------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str, at: int | None = None) -> EclSyntaxError:
        return EclSyntaxError(message, self.pos if at is None else at, self.text)

    def skip(self) -> None:
        while self.pos < len(self.text):
            if self.text[self.pos].isspace():
                self.pos += 1
            elif self.text.startswith("/*", self.pos):
                end = self.text.find("*/", self.pos + 2)
                if end < 0:
                    raise self.error("the comment is not closed ('*/' missing)")
                self.pos = end + 2
            else:
                return

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def keyword(self) -> str | None:
        """``AND``, ``OR`` or ``MINUS`` (any case) at the position, followed by a space, a
        comment or a parenthesis; or ``,`` (AND)."""
        if self.peek() == ",":
            return "AND"
        for word in ("AND", "OR", "MINUS"):
            end = self.pos + len(word)
            if self.text[self.pos : end].upper() == word:
                after = self.text[end : end + 2]
                if not after or after[:1].isspace() or after[:1] == "(" or after == "/*":
                    return word
        return None

    def parse(self) -> Expression:
        self.skip()
        if self.pos >= len(self.text):
            raise self.error("the expression is empty")
        expression = self.expression()
        self.skip()
        if self.pos < len(self.text):
            raise self.unexpected()
        return expression

    def expression(self) -> Expression:
        first = self.sub_expression()
        self.skip()
        word = self.keyword()
        if word is None:
            return first
        operands = [first]
        conjunction = word
        while word is not None:
            self.pos += 1 if self.peek() == "," else len(word)
            self.skip()
            operands.append(self.sub_expression())
            self.skip()
            following = self.keyword()
            if following is not None and following != conjunction:
                raise self.error(
                    f"{following} after {conjunction}: an expression mixing different "
                    "operators needs parentheses, e.g. (A AND B) OR C"
                )
            if conjunction == "MINUS" and following is not None:
                raise self.error("MINUS takes two operands: parenthesise, e.g. (A MINUS B) MINUS C")
            word = following
        return Compound(conjunction, tuple(operands))

    def sub_expression(self) -> Expression:
        self.skip()
        operator = None
        for op in OPERATORS:
            if self.text.startswith(op, self.pos):
                operator = op
                self.pos += len(op)
                break
        self.skip()
        char = self.peek()
        if char == "(":
            self.pos += 1
            inner = self.expression_in_parentheses()
            operand: Expression = inner
        elif char == "*":
            operand = Concept(None, None, self.pos)
            self.pos += 1
        elif char.isdigit():
            operand = self.concept_reference()
        else:
            raise self.unexpected(
                "a concept id, '*' or '('" + ("" if operator else ", or an operator such as <<")
            )
        self.skip()
        if self.peek() == ":":
            raise self.error("refinements (':') are not supported")
        if self.peek() == ".":
            raise self.error("dotted attributes ('.') are not supported")
        if self.peek() == "{":
            raise self.error("filters ('{{ }}') are not supported")
        if operator is None:
            return operand
        return Constrained(operator, operand)

    def expression_in_parentheses(self) -> Expression:
        inner = self.expression()
        self.skip()
        if self.peek() != ")":
            raise self.unexpected("')'")
        self.pos += 1
        return inner

    def concept_reference(self) -> Concept:
        start = self.pos
        while self.peek().isdigit():
            self.pos += 1
        digits = self.text[start : self.pos]
        if not 6 <= len(digits) <= 18 or digits[0] == "0":
            raise self.error(
                f"{digits!r} is not a SNOMED CT id (6 to 18 digits, not starting with 0)", start
            )
        if self.peek().isalpha():
            raise self.unexpected()
        self.skip()
        term = None
        if self.peek() == "|":
            bar = self.pos
            end = self.text.find("|", self.pos + 1)
            if end < 0:
                raise self.error("the term is not closed (a second '|' is missing)", bar)
            term = self.text[self.pos + 1 : end].strip()
            self.pos = end + 1
        return Concept(int(digits), term, start)

    def unexpected(self, wanted: str | None = None) -> EclSyntaxError:
        if self.pos >= len(self.text):
            found = "the end of the expression"
        else:
            char = self.text[self.pos]
            found = f"{char!r}"
            if char == "^":
                return self.error("member of ('^') is not supported: reference sets are not loaded")
            if char.isalpha():
                word = ""
                i = self.pos
                while i < len(self.text) and (self.text[i].isalnum()):
                    word += self.text[i]
                    i += 1
                found = f"{word!r}"
                if word.lower() in {
                    "descendantof",
                    "descendantorselfof",
                    "childof",
                    "childorselfof",
                    "ancestorof",
                    "ancestororselfof",
                    "parentof",
                    "parentorselfof",
                }:
                    return self.error(
                        f"the long form {word!r} is not supported: use <, <<, <!, >, >>, >!"
                    )
        return self.error(f"expected {wanted}, found {found}" if wanted else f"unexpected {found}")


def parse(text: str) -> Expression:
    """The syntax tree of ``text``; :class:`EclSyntaxError` with the position otherwise."""
    return _Parser(text).parse()


# --------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """The concepts an expression selects (indices into the hierarchy) and what it could not
    resolve (focus concepts not in the release's active concepts)."""

    index: Index
    unknown: list[int] = field(default_factory=list)


def evaluate(expression: Expression, hierarchy: Hierarchy) -> Evaluation:
    unknown: list[int] = []

    def run(node: Expression) -> Index:
        if isinstance(node, Concept):
            if node.sctid is None:
                return hierarchy.everything()
            i = hierarchy.index_of(node.sctid)
            if i is None:
                unknown.append(node.sctid)
                return EMPTY
            return np.asarray([i], dtype=np.int32)
        if isinstance(node, Constrained):
            seeds = run(node.operand)
            if node.operator is None:
                return seeds
            down, self_too, one_step = _OPERATOR_MEANING[node.operator]
            found = hierarchy.step(seeds, down) if one_step else hierarchy.closure(seeds, down)
            return np.union1d(found, seeds).astype(np.int32) if self_too else found
        parts = [run(operand) for operand in node.operands]
        if node.conjunction == "AND":
            out = parts[0]
            for part in parts[1:]:
                out = np.intersect1d(out, part)
            return out.astype(np.int32)
        if node.conjunction == "OR":
            return np.unique(np.concatenate(parts)).astype(np.int32)
        return np.setdiff1d(parts[0], parts[1]).astype(np.int32)

    return Evaluation(run(expression), unknown)


def concepts_named(expression: Expression) -> list[int]:
    """Every SCTID the expression names, in order."""
    out: list[int] = []

    def walk(node: Expression) -> None:
        if isinstance(node, Concept):
            if node.sctid is not None:
                out.append(node.sctid)
        elif isinstance(node, Constrained):
            walk(node.operand)
        else:
            for operand in node.operands:
                walk(operand)

    walk(expression)
    return out


def render(expression: Expression) -> str:
    """The expression in a normal form (upper-case conjunctions, parentheses where needed)."""
    if isinstance(expression, Concept):
        if expression.sctid is None:
            return "*"
        return str(expression.sctid) + (f" |{expression.term}|" if expression.term else "")
    if isinstance(expression, Constrained):
        inner = render(expression.operand)
        if isinstance(expression.operand, Compound | Constrained):
            inner = f"({inner})"
        return f"{expression.operator or ''} {inner}".strip()
    parts = [
        f"({render(o)})" if isinstance(o, Compound) else render(o) for o in expression.operands
    ]
    return f" {expression.conjunction} ".join(parts)


__all__ = [
    "Compound",
    "Concept",
    "Constrained",
    "EclSyntaxError",
    "Evaluation",
    "Expression",
    "concepts_named",
    "evaluate",
    "parse",
    "render",
]
