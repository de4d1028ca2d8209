"""The source transformations that make MSL compile as C++, all line-preserving so
that diagnostics and the emulator's error reports point at the original lines.

1. `dedupe_address_space_overloads`: MSL may overload a function on address space
   (`complex_t() thread` and `complex_t() threadgroup`, as MLX's complex.h does) or
   specialize a template for each (`pointer_element<device T*>`, MLX's steel utils).
   With the qualifiers erased those are the same definition twice; later copies are
   blanked.
2. `rewrite_threadgroup_declarations`: `threadgroup float tile[32][33];` inside a kernel
   must be ONE array shared by the threadgroup, not one per fiber. Each such declaration
   becomes a reference bound to runtime storage:
       threadgroup float (&tile)[32][33] = MSLEMU_THREADGROUP(tile, 0);
3. `protect_qualifier_attributes`: `[[threadgroup(0)]]` becomes `[[msl_threadgroup(0)]]`
   (an ignored attribute) instead of the invalid `[[(0)]]`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ADDRESS_SPACES = {"device", "constant", "thread", "threadgroup"}

_TOKEN = re.compile(
    r"""
    (?P<comment>//[^\n]*|/\*.*?\*/)
  | (?P<pp>^[ \t]*\#(?:[^\n\\]|\\.)*)
  | (?P<string>(?:u8|u|U|L)?R"(?P<delim>[^(\s]*)\(.*?\)(?P=delim)"|(?:u8|u|U|L)?"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<ident>[A-Za-z_]\w*)
  | (?P<number>\.?\d(?:[\w.]|[eEpP][+-])*)
  | (?P<punct>::|->|\.\.\.|<<=|>>=|[-+*/%&|^!=<>]=|&&|\|\||\+\+|--|<<|>>|[^\s\w])
  | (?P<space>\s+)
""",
    re.VERBOSE | re.DOTALL | re.MULTILINE,
)


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    start: int
    end: int


def tokenize(text: str) -> list[Token]:
    """Significant tokens (comments, preprocessor lines and whitespace dropped)."""
    out = []
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup if m.lastgroup != "delim" else "string"
        if kind in ("comment", "pp", "space"):
            continue
        out.append(Token(kind, m.group(), m.start(), m.end()))
    return out


def _blank(text: str, start: int, end: int) -> str:
    """Replace text[start:end] by spaces, keeping its newlines."""
    return text[:start] + re.sub(r"[^\n]", " ", text[start:end]) + text[end:]


_OPEN = {"(": ")", "[": "]", "{": "}"}


def _matching(tokens: list[Token], i: int) -> int:
    """Index of the bracket closing tokens[i]."""
    depth = 0
    for j in range(i, len(tokens)):
        t = tokens[j].text
        if t in _OPEN:
            depth += 1
        elif t in (")", "]", "}"):
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"unbalanced {tokens[i].text!r} at offset {tokens[i].start}")


_QUALIFIERS = ADDRESS_SPACES | {"const", "volatile", "noexcept", "override", "final", "&", "&&"}


def _is_function_body(tokens: list[Token], brace: int, item_start: int) -> bool:
    """Whether the `{` at `brace` opens a function body (its header ends with `)`,
    possibly followed by qualifiers) rather than a class/namespace/initializer."""
    j = brace - 1
    while j >= item_start and tokens[j].text in _QUALIFIERS:
        j -= 1
    return j >= item_start and tokens[j].text == ")"


def dedupe_address_space_overloads(text: str) -> str:
    tokens = tokenize(text)
    removals: list[tuple[int, int]] = []

    def scope(i: int, end: int) -> None:
        """Declarations in tokens[i:end] (a namespace, class or file scope)."""
        seen = set()
        item_start = i
        while i < end:
            t = tokens[i].text
            if t == ";":
                # a class (e.g. a partial specialization on `device T*`) declared twice
                item = tokens[item_start:i]
                if any(tok.text in ADDRESS_SPACES for tok in item) and any(tok.text == "{" for tok in item):
                    key = tuple(tok.text for tok in item if tok.text not in ADDRESS_SPACES)
                    if key in seen:
                        removals.append((tokens[item_start].start, tokens[i].end))
                    seen.add(key)
                item_start = i + 1
                i += 1
            elif t in ("(", "["):
                i = _matching(tokens, i) + 1
            elif t == "{":
                close = _matching(tokens, i)
                if _is_function_body(tokens, i, item_start):
                    item = tokens[item_start : close + 1]
                    header = tokens[item_start:i]
                    if any(tok.text in ADDRESS_SPACES for tok in header):
                        key = tuple(tok.text for tok in item if tok.text not in ADDRESS_SPACES)
                        if key in seen:
                            removals.append((tokens[item_start].start, tokens[close].end))
                        seen.add(key)
                    item_start = close + 1
                else:
                    scope(i + 1, close)  # class, namespace, extern "C", or an initializer
                i = close + 1
            elif t == ":" and i > item_start and tokens[i - 1].text in ("public", "private", "protected"):
                item_start = i + 1
                i += 1
            else:
                i += 1

    scope(0, len(tokens))
    for start, end in reversed(removals):
        text = _blank(text, start, end)
    return text


# Attributes spelled like an address space: `[[threadgroup(0)]]` would lose its name to
# the empty `threadgroup` macro.
_QUALIFIER_ATTRIBUTE = re.compile(r"\[\[\s*(threadgroup|device|constant|thread)\s*\(")


def protect_qualifier_attributes(text: str) -> str:
    return _QUALIFIER_ATTRIBUTE.sub(lambda m: f"[[msl_{m.group(1)}(", text)


class RewriteError(ValueError):
    """A `threadgroup` declaration the emulator cannot rewrite (or MSL forbids)."""

    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line


def _split_top_level(tokens: list[Token], sep: str) -> list[list[Token]]:
    parts, cur, depth = [], [], 0
    for t in tokens:
        if t.text in ("(", "[", "{", "<"):
            depth += 1
        elif t.text in (")", "]", "}", ">"):
            depth -= 1
        elif t.text == ">>":
            depth -= 2
        if t.text == sep and depth == 0:
            parts.append(cur)
            cur = []
        else:
            cur.append(t)
    parts.append(cur)
    return parts


def _declares_pointer(stmt: list[Token]) -> bool:
    """Whether `T* p ...` / `T& r ...`: a `*` or `&` outside brackets before any `=`."""
    depth = 0
    for t in stmt:
        if t.text in ("(", "[", "{", "<"):
            depth += 1
        elif t.text in (")", "]", "}", ">"):
            depth -= 1
        elif t.text == "=" and depth == 0:
            return False
        elif t.text in ("*", "&", "&&") and depth == 0:
            return True
    return False


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def rewrite_threadgroup_declarations(text: str) -> str:
    """Rewrite every statement `threadgroup T a[..], b;` into references to shared
    storage, each declarator with its own site number."""
    tokens = tokenize(text)
    edits = []
    site = 0
    for i, tok in enumerate(tokens):
        if tok.text != "threadgroup" or (i > 0 and tokens[i - 1].text not in ("{", "}", ";")):
            continue
        j = i
        depth = 0
        while j < len(tokens) and not (tokens[j].text == ";" and depth == 0):
            if tokens[j].text in _OPEN:
                depth += 1
            elif tokens[j].text in (")", "]", "}"):
                depth -= 1
            j += 1
        stmt = tokens[i + 1 : j]
        if _declares_pointer(stmt):
            continue  # a pointer or reference to threadgroup memory, not storage
        declarators = _split_top_level(stmt, ",")
        line = _line_of(text, tok.start)
        where = f"line {line}"
        # The type is everything before the first declarator's name.
        first = declarators[0]
        bracket = next((k for k, t in enumerate(first) if t.text == "["), len(first))
        if bracket == 0 or first[bracket - 1].kind != "ident":
            raise RewriteError(
                f"{where}: cannot parse threadgroup declaration {text[tok.start:tokens[j-1].end]!r}", line
            )
        type_tokens = first[: bracket - 1]
        if not type_tokens:
            raise RewriteError(f"{where}: threadgroup declaration without a type", line)
        type_text = text[type_tokens[0].start : type_tokens[-1].end]
        pieces = []
        for k, d in enumerate(declarators):
            decl = d[len(type_tokens) :] if k == 0 else d
            if any(t.text == "=" for t in decl) or any(t.text == "{" for t in decl):
                raise RewriteError(f"{where}: MSL does not allow an initializer on a threadgroup variable", line)
            if not decl or decl[0].kind != "ident" or (len(decl) > 1 and decl[1].text != "["):
                raise RewriteError(
                    f"{where}: cannot rewrite threadgroup declaration {text[tok.start:tokens[j-1].end]!r}; "
                    "declare one threadgroup array or scalar per statement",
                    line,
                )
            name = decl[0].text
            dims = text[decl[1].start : decl[-1].end] if len(decl) > 1 else ""
            binder = f"(&{name}){dims}" if dims else f"&{name}"
            pieces.append(f"threadgroup {type_text} {binder} = MSLEMU_THREADGROUP({name}, {site});")
            site += 1
        edits.append((tok.start, tokens[j].end, " ".join(pieces)))
    for start, end, new in reversed(edits):
        newlines = text.count("\n", start, end)
        text = text[:start] + new + "\n" * newlines + text[end:]
    return text
