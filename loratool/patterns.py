"""Regular expressions from users and configs, matched in bounded time.

Patterns come from places an attacker or a careless user controls: `--modules`, `--module-weights`,
a PEFT config's `target_modules`, `rank_pattern` / `alpha_pattern` keys. Python's `re` backtracks,
so `(a|aa)+$` against a 40-character name takes seconds and doubles with every character, and
`a{4294967295}` or 3,000 nested groups make compiling itself fail in ways that are not re.error.

`compile_pattern` parses a pattern with re's own parser (so the syntax and the meaning are re's)
and picks, per name matched, one of two engines:

- re itself, when the pattern's worst case on that name is small: with k repeats that may run
  more than once and alternatives a_1..a_j, a backtracking matcher tries at most about
  a_1·...·a_j · (n+1)^(k+1) paths on a name of n characters (one more power for a search);
  below WORK_BOUND steps re is used as it is (fast, and every common pattern falls here);
- otherwise a matcher without backtracking (a Thompson/Pike NFA simulation over the parsed pattern:
  each position of the name is visited once per instruction, so the cost is O(n · size)), which
  gives the same answer as re for everything it accepts. Backreferences, conditional groups,
  atomic groups and possessive repeats are not regular: such a pattern is refused when it would need
  this matcher, with a message that says so.

Programs are limited to MAX_INSTRUCTIONS (a counted repeat is unrolled): `a{100000}` is refused
rather than built. Every refusal is a PatternError, a re.error, so callers' `except re.error`
gives the user one clear line.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from re import _constants as c  # type: ignore[attr-defined]
from re import _parser  # type: ignore[attr-defined]
from typing import Any

from loratool.errors import IncompatibleError

WORK_BOUND = 1_000_000  # worst-case backtracking steps allowed for re on one name
MAX_INSTRUCTIONS = 10_000  # size of an unrolled program (counted repeats unrolled)
MAX_PATTERN_CHARS = 100_000


class PatternError(re.error):
    """A pattern that cannot be matched safely (or is not a valid regular expression at all)."""


@dataclass(frozen=True)
class _Cost:
    repeats: int  # repeats whose maximum is above 1
    alternatives: int  # product of the alternative counts
    choices: bool  # any repeat or alternative at all
    nested: bool  # a repeat running more than once over a part with choices: exponential when backtracking


def compile_pattern(pattern: str, flags: int = 0) -> SafePattern:
    """A regular expression matched in bounded time (module docstring).

    Raises:
        PatternError: not a valid regular expression, or too large to match in bounded time.
    """
    if not isinstance(pattern, str):
        raise PatternError(f"expected a string, got {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"pattern of {len(pattern)} characters (at most {MAX_PATTERN_CHARS})")

    try:
        parsed = _parser.parse(pattern, flags)
        compiled = re.compile(pattern, flags)
    except re.error as e:
        raise PatternError(str(e)) from None
    except RecursionError:
        raise PatternError("nested too deeply") from None
    except (OverflowError, ValueError, MemoryError) as e:
        raise PatternError(f"{type(e).__name__}: {e}") from None
    try:
        cost = _cost(parsed.data)
    except RecursionError:
        raise PatternError("nested too deeply") from None
    program: _Program | str
    try:
        program = _program(parsed)
    except PatternError as e:
        if cost.nested:  # re alone could take exponential time on some name
            raise
        program = str(e)  # re alone then, on names short enough for its worst case
    except RecursionError:
        raise PatternError("nested too deeply") from None
    return SafePattern(pattern, compiled, cost, program)


class SafePattern:
    """search / match / fullmatch answering True or False, each in bounded time."""

    def __init__(self, pattern: str, compiled: re.Pattern[str], cost: _Cost, program: _Program | str) -> None:
        self.pattern = pattern
        self._re = compiled
        self._cost = cost
        self._program = program

    def search(self, name: str) -> bool:
        return self._run(name, "search")

    def match(self, name: str) -> bool:
        return self._run(name, "match")

    def fullmatch(self, name: str) -> bool:
        return self._run(name, "fullmatch")

    def _run(self, name: str, how: str) -> bool:
        """Raises: IncompatibleError: re's worst case on this name is too long and the pattern has
        what only re can match (a backreference, ...)."""
        powers = self._cost.repeats + 1 + (how == "search")
        cheap = not self._cost.nested and self._cost.alternatives * (len(name) + 1) ** powers <= WORK_BOUND
        if cheap:
            return getattr(self._re, how)(name) is not None
        if isinstance(self._program, str):
            raise IncompatibleError(f"pattern {self.pattern!r}: too costly to match against a name of {len(name)} "
                                    f"characters with backtracking, and {self._program}", hint="simplify the pattern")
        return self._program.run(name, how)


def _program(parsed: Any) -> _Program:
    if _size(parsed.data) > MAX_INSTRUCTIONS:
        raise PatternError(f"too large to match without backtracking (over {MAX_INSTRUCTIONS} steps once its "
                           "counted repeats are unrolled)")
    return _Compiler(int(parsed.state.flags)).program(parsed.data)


# ---------------------------------------------------------------------------------------------
# the worst case of a backtracking matcher, from the parsed pattern


def _cost(items: Any) -> _Cost:

    repeats, alternatives, choices, nested = 0, 1, False, False
    for op, av in items:
        subs: list[Any] = []
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            lo, hi, item = av
            body = _cost(item.data)
            many = hi is c.MAXREPEAT or hi > 1
            choices = choices or lo != hi or body.choices
            nested = nested or body.nested or (many and body.choices)
            repeats += body.repeats + (1 if many and lo != hi else 0)  # a body with repeats under `many` is nested
            alternatives = min(alternatives * body.alternatives, WORK_BOUND + 1)
            continue
        if op is c.SUBPATTERN:
            subs = [av[3]]
        elif op is c.BRANCH:
            alternatives = min(alternatives * len(av[1]), WORK_BOUND + 1)
            choices = True
            subs = list(av[1])
        elif op in (c.ASSERT, c.ASSERT_NOT):
            subs = [av[1]]
        elif op is c.ATOMIC_GROUP:
            subs = [av]
        elif op is c.GROUPREF_EXISTS:
            alternatives = min(alternatives * 2, WORK_BOUND + 1)
            choices = True
            subs = [s for s in av[1:] if s is not None]
        for s in subs:
            inner = _cost(s.data)
            repeats += inner.repeats
            alternatives = min(alternatives * inner.alternatives, WORK_BOUND + 1)
            choices = choices or inner.choices
            nested = nested or inner.nested
    return _Cost(repeats, alternatives, choices, nested)


def _size(items: Any) -> int:
    """About how many instructions the matcher's program of `items` has (counted repeats unrolled)."""

    total = 0
    for op, av in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            lo, hi, item = av
            body = _size(item.data) + 1
            total += body * (lo + (1 if hi is c.MAXREPEAT else hi - lo))
        elif op is c.SUBPATTERN:
            total += _size(av[3].data)
        elif op is c.BRANCH:
            total += sum(_size(a.data) + 2 for a in av[1])
        elif op in (c.ASSERT, c.ASSERT_NOT):
            total += _size(av[1].data) + 2
        else:
            total += 1
        if total > MAX_INSTRUCTIONS:
            return total
    return total


# ---------------------------------------------------------------------------------------------
# the matcher without backtracking

# instructions: ("char", test) consumes one character; ("split", a, b), ("jmp", a) and
# ("at", code), ("look", ahead, negate, program, width) are conditions on the position; ("match",).


class _Program:
    def __init__(self, code: list[tuple[Any, ...]]) -> None:
        self.code = code
        self._looks: dict[tuple[int, int], bool] = {}

    def run(self, text: str, how: str, start: int = 0, end: int | None = None) -> bool:
        """search / match / fullmatch over text[start:end] (assertions see the whole text)."""
        end = len(text) if end is None else end
        self._looks.clear()  # positions of another text
        current = self._closure({0}, text, start)
        for pos in range(start, end + 1):
            if self._accepts(current, how, pos == end):
                return True
            if pos == end:
                break
            ch = text[pos]
            step: set[int] = set()
            for pc in current:
                ins = self.code[pc]
                if ins[0] == "char" and ins[1](ch):
                    step.add(pc + 1)
            if how == "search":
                step.add(0)
            current = self._closure(step, text, pos + 1)
            if not current and how != "search":
                return False
        return False

    def _accepts(self, states: set[int], how: str, at_end: bool) -> bool:
        match = any(self.code[pc][0] == "match" for pc in states)
        return match and (at_end or how != "fullmatch")

    def _closure(self, seeds: set[int], text: str, pos: int) -> set[int]:
        out: set[int] = set()
        seen: set[int] = set()
        stack = list(seeds)
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            ins = self.code[pc]
            kind = ins[0]
            if kind == "jmp":
                stack.append(ins[1])
            elif kind == "split":
                stack.extend((ins[1], ins[2]))
            elif kind == "at":
                if _at(ins[1], text, pos):
                    stack.append(pc + 1)
            elif kind == "look":
                if self._look(pc, ins, text, pos):
                    stack.append(pc + 1)
            else:
                out.add(pc)
        return out

    def _look(self, pc: int, ins: tuple[Any, ...], text: str, pos: int) -> bool:
        memo = (pc, pos)
        if memo not in self._looks:
            _, ahead, negate, sub, width = ins
            if ahead:
                found = sub.run(text, "match", pos)
            else:
                found = pos >= width and sub.run(text, "fullmatch", pos - width, pos)
            self._looks[memo] = found != negate
            if len(self._looks) > 100_000:
                self._looks.clear()
        return self._looks[memo]


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _at(code: Any, text: str, pos: int) -> bool:

    n = len(text)
    if code in (c.AT_BEGINNING_STRING,):
        return pos == 0
    if code is c.AT_BEGINNING:
        return pos == 0
    if code is c.AT_BEGINNING_LINE:
        return pos == 0 or text[pos - 1] == "\n"
    if code is c.AT_END_STRING:
        return pos == n
    if code is c.AT_END:
        return pos == n or (pos == n - 1 and text[pos] == "\n")
    if code is c.AT_END_LINE:
        return pos == n or text[pos] == "\n"
    if code in (c.AT_BOUNDARY, c.AT_NON_BOUNDARY):
        before = pos > 0 and _is_word(text[pos - 1])
        after = pos < n and _is_word(text[pos])
        return (before != after) == (code is c.AT_BOUNDARY)
    raise PatternError(f"unsupported position assertion {code}")


class _Compiler:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.code: list[tuple[Any, ...]] = []

    def program(self, items: Any) -> _Program:
        self.emit_seq(items, self.flags)
        self.add(("match",))
        return _Program(self.code)

    def add(self, ins: tuple[Any, ...]) -> int:
        if len(self.code) >= MAX_INSTRUCTIONS:
            raise PatternError(f"too large to match without backtracking (over {MAX_INSTRUCTIONS} steps "
                               "once its counted repeats are unrolled)")
        self.code.append(ins)
        return len(self.code) - 1

    def patch(self, at: int, ins: tuple[Any, ...]) -> None:
        self.code[at] = ins

    def emit_seq(self, items: Any, flags: int) -> None:
        for op, av in items:
            self.emit(op, av, flags)

    def emit(self, op: Any, av: Any, flags: int) -> None:

        if op in (c.LITERAL, c.NOT_LITERAL, c.ANY, c.IN):
            self.add(("char", _char_test(op, av, flags)))
        elif op is c.SUBPATTERN:
            _, add_flags, del_flags, sub = av
            self.emit_seq(sub, (flags | int(add_flags)) & ~int(del_flags))
        elif op is c.BRANCH:
            self.emit_branch(av[1], flags)
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT):
            self.emit_repeat(av, flags)
        elif op is c.AT:
            code = av
            if flags & int(re.MULTILINE):
                code = {c.AT_BEGINNING: c.AT_BEGINNING_LINE, c.AT_END: c.AT_END_LINE}.get(code, code)
            self.add(("at", code))
        elif op in (c.ASSERT, c.ASSERT_NOT):
            direction, sub = av
            width = 0
            if direction < 0:
                lo, hi = sub.getwidth()
                if lo != hi:
                    raise PatternError("look-behind requires fixed-width pattern")
                width = lo
            inner = _Compiler(flags)
            inner.emit_seq(sub, flags)
            inner.add(("match",))
            if len(self.code) + len(inner.code) >= MAX_INSTRUCTIONS:
                raise PatternError(f"too large to match without backtracking (over {MAX_INSTRUCTIONS} steps)")
            self.add(("look", direction >= 0, op is c.ASSERT_NOT, _Program(inner.code), width))
        else:
            what = {c.GROUPREF: "a backreference", c.GROUPREF_EXISTS: "a conditional group",
                    c.ATOMIC_GROUP: "an atomic group", c.POSSESSIVE_REPEAT: "a possessive repeat"}.get(op, str(op))
            raise PatternError(f"{what} cannot be matched without backtracking, and this pattern could take "
                               "exponential time with it; simplify the pattern")

    def emit_branch(self, alternatives: list[Any], flags: int) -> None:
        jumps: list[int] = []
        for i, alt in enumerate(alternatives):
            if i < len(alternatives) - 1:
                split = self.add(("split", -1, -1))
                self.emit_seq(alt, flags)
                jumps.append(self.add(("jmp", -1)))
                self.patch(split, ("split", split + 1, len(self.code)))
            else:
                self.emit_seq(alt, flags)
        for j in jumps:
            self.patch(j, ("jmp", len(self.code)))

    def emit_repeat(self, av: Any, flags: int) -> None:

        lo, hi, item = av
        for _ in range(lo):
            self.emit_seq(item, flags)
        if hi is c.MAXREPEAT:
            split = self.add(("split", -1, -1))
            self.emit_seq(item, flags)
            self.add(("jmp", split))
            self.patch(split, ("split", split + 1, len(self.code)))
            return
        splits: list[int] = []
        for _ in range(hi - lo):
            splits.append(self.add(("split", -1, -1)))
            self.emit_seq(item, flags)
        for s in splits:
            self.patch(s, ("split", s + 1, len(self.code)))


def _char_test(op: Any, av: Any, flags: int) -> Any:

    fold = bool(flags & int(re.IGNORECASE))
    ascii_only = bool(flags & int(re.ASCII))
    dotall = bool(flags & int(re.DOTALL))

    def variants(ch: str) -> tuple[str, ...]:
        return (ch, ch.lower(), ch.upper(), ch.casefold()) if fold else (ch,)

    if op is c.ANY:
        return (lambda ch: True) if dotall else (lambda ch: ch != "\n")
    if op in (c.LITERAL, c.NOT_LITERAL):
        wanted = set(variants(chr(av)))
        if op is c.LITERAL:
            return lambda ch: any(v in wanted for v in variants(ch))
        return lambda ch: not any(v in wanted for v in variants(ch))
    items = list(av)
    negate = bool(items) and items[0][0] is c.NEGATE
    if negate:
        items = items[1:]
    tests = [_class_item(o, a, ascii_only) for o, a in items]

    def member(ch: str) -> bool:
        return any(t(v) for v in variants(ch) for t in tests)

    return (lambda ch: not member(ch)) if negate else member


def _class_item(op: Any, av: Any, ascii_only: bool) -> Any:

    if op is c.LITERAL:
        return lambda ch: ord(ch) == av
    if op is c.RANGE:
        lo, hi = av
        return lambda ch: lo <= ord(ch) <= hi
    if op is c.CATEGORY:
        return _category(av, ascii_only)
    raise PatternError(f"unsupported character class item {op}")


def _category(code: Any, ascii_only: bool) -> Any:

    def in_ascii(fn: Any) -> Any:
        return (lambda ch: ch.isascii() and fn(ch)) if ascii_only else fn

    digit = in_ascii(lambda ch: unicodedata.decimal(ch, None) is not None)
    space = in_ascii(str.isspace) if not ascii_only else (lambda ch: ch in " \t\n\r\f\v")
    word = in_ascii(_is_word)
    table = {c.CATEGORY_DIGIT: digit, c.CATEGORY_SPACE: space, c.CATEGORY_WORD: word}
    negated = {c.CATEGORY_NOT_DIGIT: digit, c.CATEGORY_NOT_SPACE: space, c.CATEGORY_NOT_WORD: word}
    if code in table:
        return table[code]
    if code in negated:
        fn = negated[code]
        return lambda ch: not fn(ch)
    raise PatternError(f"unsupported character category {code}")
