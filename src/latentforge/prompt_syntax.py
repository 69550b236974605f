"""AUTOMATIC1111's prompt weighting syntax, parsed into weighted text runs.

`(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1, `(text:1.3)` sets
the factor to 1.3; brackets nest and their factors multiply (`((text))` is 1.21). `\\(`, `\\)`,
`\\[`, `\\]` and `\\\\` are the literal characters; any other backslash is dropped. The word
`BREAK` (in capitals, a whole word) ends the current text-encoder chunk (see models/text.py).

Two differences from A1111, both on input it would silently misread: an unbalanced or crossed
bracket is an error naming its position (A1111 closes open brackets at the end and keeps a
stray `)` as text), and so is prompt editing / alternation (`[cat:dog:0.5]`, `[cat|dog]`),
which latentforge does not schedule.
"""

from __future__ import annotations

import re

from .errors import UserError

ROUND, SQUARE = 1.1, 1 / 1.1  # A1111's factors for ( ) and [ ]
BREAK = "BREAK"
_WEIGHT = re.compile(r":\s*([+-]?[\d.]+)\s*\)")  # "(text:1.3)" from its colon to the ")"
_ESCAPABLE = "()[]\\"
_SPECIAL = set("()[]\\:|B")  # where a plain run may end ("B": perhaps BREAK)

Section = list[tuple[str, float]]


def _is_break(text: str, i: int) -> bool:
    """BREAK at text[i] as a whole word (A1111's `\\bBREAK\\b`)."""
    end = i + len(BREAK)
    if text[i:end] != BREAK:
        return False
    before = text[i - 1] if i else " "
    after = text[end] if end < len(text) else " "
    return not (before.isalnum() or before == "_" or after.isalnum() or after == "_")


def parse_prompt(prompt: str) -> list[Section]:
    """A prompt -> its sections (split at BREAK), each a list of (text, weight) runs with
    neighbouring runs of equal weight merged, as A1111's `parse_prompt_attention` gives them.

    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).)" ->
    [[("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
    (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]] (weights to float precision).
    Raises UserError for an unbalanced bracket, prompt editing or a malformed weight.
    """
    # runs: [text, weight] or None for BREAK; a bracket multiplies the runs after its opening
    runs: list[list | None] = []
    stack: list[tuple[str, int, int]] = []  # (bracket, position in prompt, first run index)
    buf: list[str] = []

    def flush() -> None:
        if buf:
            runs.append(["".join(buf), 1.0])
            buf.clear()

    def close(pos: int, bracket: str, factor: float) -> None:
        flush()
        if not stack or stack[-1][0] != bracket:
            if stack:
                opener, at, _ = stack[-1]
                raise UserError(
                    f"prompt: {prompt[pos]!r} at character {pos + 1} closes {opener!r} opened "
                    f"at character {at + 1}"
                )
            raise UserError(
                f"prompt: unbalanced {prompt[pos]!r} at character {pos + 1} "
                f"(write \\{prompt[pos]} for the literal character)"
            )
        for run in runs[stack.pop()[2] :]:
            if run is not None:
                run[1] *= factor

    i, n = 0, len(prompt)
    while i < n:
        c = prompt[i]
        if c == "\\":
            if i + 1 < n and prompt[i + 1] in _ESCAPABLE:
                buf.append(prompt[i + 1])
            i += 2 if i + 1 < n and prompt[i + 1] in _ESCAPABLE else 1
        elif c in "([":
            flush()
            stack.append((c, i, len(runs)))
            i += 1
        elif c == ")":
            close(i, "(", ROUND)
            i += 1
        elif c == "]":
            close(i, "[", SQUARE)
            i += 1
        elif c == ":" and stack and stack[-1][0] == "(" and (m := _WEIGHT.match(prompt, i)):
            try:
                weight = float(m.group(1))
            except ValueError:
                raise UserError(
                    f"prompt: weight {m.group(1)!r} at character {i + 2} is not a number"
                ) from None
            close(m.end() - 1, "(", weight)
            i = m.end()
        elif c in ":|" and stack and stack[-1][0] == "[":
            raise UserError(
                f"prompt: {c!r} at character {i + 1} inside [ ] is A1111's prompt editing / "
                "alternation, which latentforge does not support (write \\[ for a literal "
                "bracket)"
            )
        elif c == "B" and _is_break(prompt, i):
            while buf and not buf[-1].strip():  # A1111 eats the whitespace around BREAK
                buf.pop()
            if buf:
                buf[-1] = buf[-1].rstrip()
            flush()
            runs.append(None)
            i += len(BREAK)
            while i < n and prompt[i].isspace():
                i += 1
        else:
            j = i + 1
            while j < n and prompt[j] not in _SPECIAL:
                j += 1
            buf.append(prompt[i:j])
            i = j
    flush()
    if stack:
        bracket, at, _ = stack[-1]
        closer = ")" if bracket == "(" else "]"
        raise UserError(
            f"prompt: unbalanced {bracket!r} at character {at + 1} (no {closer!r} closes it; "
            f"write \\{bracket} for the literal character)"
        )
    sections: list[Section] = [[]]
    for run in runs:
        if run is None:
            sections.append([])
        elif sections[-1] and sections[-1][-1][1] == run[1]:
            sections[-1][-1] = (sections[-1][-1][0] + run[0], run[1])
        else:
            sections[-1].append((run[0], run[1]))
    return [s or [("", 1.0)] for s in sections]


def plain_text(prompt: str) -> str:
    """The prompt's words without the syntax (what a layout planner reads): the runs' text,
    sections joined by a space."""
    return " ".join("".join(text for text, _ in section) for section in parse_prompt(prompt))


def escape(text: str) -> str:
    """Plain text as a prompt that reads back as exactly that text (brackets and backslashes
    escaped): for captions written without the syntax in mind. BREAK has no escape."""
    return re.sub(r"([()\[\]\\])", r"\\\1", text)
