"""The shell commands of the project's Markdown pages, cut out as a reader would type them.

A fenced block whose info string is ``bash``, ``sh``, ``shell`` or ``console`` holds commands:

* a line ending in a backslash continues on the next line (joined with one space);
* a ``for``/``while``/``if`` compound runs to its ``done``/``fi`` (kept as one command);
* whole-line comments are dropped, and so is a trailing `` # comment`` outside quotes;
* in a ``console`` block only the lines after a ``$ `` prompt are commands (the rest is output).

Other fenced blocks (``text``, ``yaml``, ``python``, no info string) are not commands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SHELL_LANGS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
COMPOUND_OPEN = re.compile(r"^(for|while|until|if)\b")
COMPOUND_CLOSE = re.compile(r"^(done|fi)\b")
COMPOUND_END = re.compile(r"\b(done|fi)$")  # a one-line compound
# what a command line in an untagged block would start with
COMMAND_WORDS = re.compile(r"^(\$ )?(python3?|torchrun|make|pip|source|bash|\.venv/bin/)\b")


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str  # the info string's first word, "" for none
    lines: tuple[str, ...]


@dataclass(frozen=True)
class Command:
    doc: str
    line: int  # 1-based line where the command starts
    text: str  # the command as bash receives it (continuations joined, comments dropped)


def fenced_blocks(doc: Path, root: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with its info string and body lines."""
    blocks, opened, body = [], None, []
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        match = FENCE.match(line)
        if opened is None and match:
            opened, body = (number, match.group(1), match.group(2).lower()), []
        elif opened is not None and line.strip().startswith(opened[1]) and not line.strip().strip("`~"):
            blocks.append(Block(str(doc.relative_to(root)), opened[0], opened[2], tuple(body)))
            opened = None
        elif opened is not None:
            body.append(line)
    if opened is not None:
        raise ValueError(f"{doc}:{opened[0]}: fenced block never closed")
    return blocks


def strip_trailing_comment(line: str) -> str:
    """``cmd args  # note`` -> ``cmd args``; a ``#`` inside quotes or inside a word stays."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """(1-based line, text) of each logical line of a shell block: continuations joined,
    comments, blank lines and console output dropped."""
    lines: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for offset, raw in enumerate(block.lines, 1):
        line = raw.strip()
        if not pending:
            if block.lang == "console":
                if not line.startswith("$ "):
                    continue  # output
                line = line[2:].strip()
            if not line or line.startswith("#"):
                continue
            start = block.line + offset
        line = strip_trailing_comment(line)
        if line.endswith("\\"):
            pending.append(line[:-1].rstrip())
            continue
        lines.append((start, " ".join([*pending, line])))
        pending = []
    if pending:
        raise ValueError(f"{block.doc}:{start}: the command's last line ends in a backslash")
    return lines


def block_commands(block: Block) -> list[Command]:
    """The commands of one shell block: its logical lines, a compound (for/while/if) kept whole."""
    commands: list[Command] = []
    group: list[tuple[int, str]] = []
    depth = 0
    for start, line in logical_lines(block):
        if COMPOUND_OPEN.match(line) and not COMPOUND_END.search(line):
            depth += 1
        elif COMPOUND_CLOSE.match(line):
            depth -= 1
        group.append((start, line))
        if depth == 0:
            commands.append(Command(block.doc, group[0][0], "\n".join(text for _, text in group)))
            group = []
    if group:
        raise ValueError(f"{block.doc}:{group[0][0]}: a for/while/if without its done/fi")
    return commands


def documented_commands(docs: list[Path], root: Path) -> list[Command]:
    """Every command of the shell blocks of ``docs``, in page order."""
    blocks = [b for doc in docs for b in fenced_blocks(doc, root) if b.lang in SHELL_LANGS]
    return [command for block in blocks for command in block_commands(block)]


def untagged_command_lines(docs: list[Path], root: Path) -> list[str]:
    """``doc:line: text`` for each line of a block without a shell info string that looks like a
    command (so a command cannot escape the test by losing its ``bash`` tag)."""
    found = []
    for doc in docs:
        for block in fenced_blocks(doc, root):
            if block.lang in SHELL_LANGS or block.lang in ("python", "yaml", "json"):
                continue
            for offset, line in enumerate(block.lines, 1):
                if COMMAND_WORDS.match(line.strip()):
                    found.append(f"{block.doc}:{block.line + offset}: {line.strip()}")
    return found


LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def broken_links(docs: list[Path], root: Path) -> list[str]:
    """``doc: target`` for each relative link whose file, or whose ``#anchor`` heading, is missing."""
    broken = []
    for doc in docs:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{doc.relative_to(root)}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                headings = [line for line in file.read_text().splitlines() if line.startswith("#")]
                if anchor not in {heading_anchor(h) for h in headings}:
                    broken.append(f"{doc.relative_to(root)}: {target} (no such heading)")
    return broken
