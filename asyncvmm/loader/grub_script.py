"""GRUB 2's script language, as far as generated grub.cfg files use it: the lexer (words
with '...' and "..." quoting, $var and ${var}, backslash escapes and continuations, `;` and
newlines, comments) and the parser (commands, if/elif/else/fi, `function NAME { }`,
`menuentry TITLE ... { }`, `submenu TITLE ... { }`). grub.py runs what this parses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import LoaderError

# -- lexing -----------------------------------------------------------------------------


@dataclass
class Word:
    """A word as written: its parts are literal text ('lit', text, quoted) or a variable
    ('var', name, quoted). An unquoted variable is split into fields when expanded."""

    parts: list[tuple[str, str, bool]]
    line: int

    @property
    def bare(self) -> str | None:
        """The word's text if it is one unquoted literal (a keyword, `{`, `}`)."""
        if len(self.parts) == 1 and self.parts[0][0] == "lit" and not self.parts[0][2]:
            return self.parts[0][1]
        return None


SEP = object()  # end of a command: a newline or `;`
_NAME = re.compile(r"[A-Za-z0-9_]+|[?#@*]")


def lex(text: str, where: str) -> list:
    tokens: list = []
    i, n, line = 0, len(text), 1
    while i < n:
        c = text[i]
        if c in " \t\r":
            i += 1
        elif c == "\\" and text.startswith("\n", i + 1):
            i, line = i + 2, line + 1
        elif c == "\n" or c == ";":
            tokens.append(SEP)
            line += c == "\n"
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        else:
            word, i, line = _word(text, i, line, where)
            tokens.append(word)
    tokens.append(SEP)
    return tokens


def _word(text: str, i: int, line: int, where: str) -> tuple[Word, int, int]:
    parts: list[tuple[str, str, bool]] = []
    start_line = line
    n = len(text)

    def lit(s: str, quoted: bool) -> None:
        if parts and parts[-1][0] == "lit" and parts[-1][2] == quoted:
            parts[-1] = ("lit", parts[-1][1] + s, quoted)
        else:
            parts.append(("lit", s, quoted))

    while i < n and text[i] not in " \t\r\n;":
        c = text[i]
        if c == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise LoaderError(f"{where} line {line}: a ' is not closed")
            lit(text[i + 1 : end], True)
            line += text.count("\n", i, end)
            i = end + 1
        elif c == '"':
            i += 1
            while True:
                if i >= n:
                    raise LoaderError(f"{where} line {start_line}: a \" is not closed")
                c = text[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n and text[i + 1] in '$"\\\n':
                    if text[i + 1] != "\n":
                        lit(text[i + 1], True)
                    line += text[i + 1] == "\n"
                    i += 2
                elif c == "$":
                    name, i = _var(text, i, line, where)
                    if name is None:
                        lit("$", True)
                    else:
                        parts.append(("var", name, True))
                else:
                    lit(c, True)
                    line += c == "\n"
                    i += 1
        elif c == "\\":
            if i + 1 < n and text[i + 1] == "\n":
                line += 1
            elif i + 1 < n:
                lit(text[i + 1], True)
            i += 2
        elif c == "$":
            name, i = _var(text, i, line, where)
            if name is None:
                lit("$", False)
            else:
                parts.append(("var", name, False))
        else:
            lit(c, False)
            i += 1
    return Word(parts, start_line), i, line


def _var(text: str, i: int, line: int, where: str) -> tuple[str | None, int]:
    if text.startswith("{", i + 1):
        end = text.find("}", i + 2)
        if end < 0:
            raise LoaderError(f"{where} line {line}: a ${{ is not closed")
        return text[i + 2 : end], end + 1
    m = _NAME.match(text, i + 1)
    if not m:
        return None, i + 1
    return m.group(0), m.end()


# -- parsing ----------------------------------------------------------------------------


@dataclass
class Cmd:
    words: list[Word]


@dataclass
class If:
    branches: list[tuple[list, list]]  # (condition, body) for if and each elif
    otherwise: list | None


@dataclass
class Block:
    kind: str  # menuentry, submenu, function
    words: list[Word]  # after the keyword, before `{`
    body: list


class _Parser:
    def __init__(self, tokens: list, where: str):
        self.tokens = tokens
        self.i = 0
        self.where = where

    def error(self, message: str) -> LoaderError:
        line = next((t.line for t in self.tokens[self.i :] if isinstance(t, Word)), None)
        return LoaderError(f"{self.where} {'at its end' if line is None else f'line {line}'}: {message}")

    def peek_keyword(self) -> str | None:
        while self.i < len(self.tokens) and self.tokens[self.i] is SEP:
            self.i += 1
        if self.i >= len(self.tokens):
            return None
        return self.tokens[self.i].bare

    def statements(self, until: tuple[str, ...]) -> list:
        out: list = []
        while True:
            kw = self.peek_keyword()
            if self.i >= len(self.tokens):
                if until:
                    raise self.error(f"missing {' or '.join(until)}")
                return out
            if kw in until:
                return out
            out.append(self.statement())

    def statement(self):
        kw = self.tokens[self.i].bare
        if kw == "if":
            return self.if_()
        if kw in ("menuentry", "submenu", "function"):
            self.i += 1
            words = []
            while not (isinstance(self.tokens[self.i], Word) and self.tokens[self.i].bare == "{"):
                tok = self.tokens[self.i]
                if tok is SEP:
                    if kw == "function" and words:  # `function name` then `{` on the next line
                        self.i += 1
                        continue
                    raise self.error(f"{kw} without a {{")
                words.append(tok)
                self.i += 1
            self.i += 1
            body = self.statements(("}",))
            self.i += 1
            return Block(kw, words, body)
        if kw in ("for", "while", "until"):
            raise self.error(f"`{kw}` loops are not something a generated grub.cfg has; the loader does not run them")
        if kw in ("then", "elif", "else", "fi", "}", "{"):
            raise self.error(f"unexpected {kw}")
        words = []
        while self.tokens[self.i] is not SEP:
            words.append(self.tokens[self.i])
            self.i += 1
        return Cmd(words)

    def if_(self) -> If:
        branches = []
        otherwise = None
        self.i += 1  # if
        while True:
            cond = self.statements(("then",))
            self.i += 1
            body = self.statements(("elif", "else", "fi"))
            branches.append((cond, body))
            kw = self.tokens[self.i].bare
            self.i += 1
            if kw == "elif":
                continue
            if kw == "else":
                otherwise = self.statements(("fi",))
                self.i += 1
            return If(branches, otherwise)


def parse(text: str, where: str) -> list:
    return _Parser(lex(text, where), where).statements(())
