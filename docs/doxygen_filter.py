#!/usr/bin/env python3
"""Doxygen INPUT_FILTER for diffuse's headers: plain `//` comments become documentation.

The headers are commented with ordinary `//` lines (no `///`), written as plain text.
This filter, run by doxygen on every input file (docs/Doxyfile.in), prints the file with

  * the comment block at the top of the file turned into the file's documentation (`\\file`);
  * each block of full-line `//` comments at namespace or class scope that sits directly above a
    declaration (no blank line between) turned into `///`, so it documents that declaration;
  * a trailing `// ...` after a member or enumerator (`int x;  // ...`, `A,  // ...`) turned into
    `///< ...`;
  * in those comments, the characters doxygen would read as markup (\\ @ < > & % # $) escaped,
    except in `code spans` and "quoted text" (doxygen shows both as written), so plain text
    stays plain text and never trips a warning
    (`__shared__` and the like become code spans, `0 .. n` and `>::` are made safe as well).

Comments inside function bodies, section banners (a comment followed by a blank line), comments
above #include/#if, `namespace`, access specifiers or a closing brace stay ordinary comments.
Line numbers are unchanged: nothing is added or removed, only comment lines are rewritten.
"""
import re
import sys

SCOPE_RE = re.compile(r"\b(namespace|class|struct|union|enum)\b")
ESCAPE = set("\\@<>&%#$")
DUNDER_RE = re.compile(r"__\w+?__(?!\w)")
# A dot after these does not end the first sentence (JAVADOC_AUTOBRIEF's brief description).
ABBREV_RE = re.compile(r"(e\.g|i\.e|vs|cf|etc)\.(?=\s|$)")


def word_char(text, i):
    return 0 <= i < len(text) and (text[i].isalnum() or text[i] == "_")


def escape_text(text):
    """Escapes what doxygen reads as markup in plain text (one comment line, or several joined
    by newlines, which is how doxygen pairs backticks and quotes too).

    `code spans` and "quoted text" are left as they are: doxygen shows both literally. A lone
    backtick or quote is literal text.
    """
    out = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c in "`\"":
            j = text.find(c, i + 1)
            if j > i + 1:
                out.append(text[i:j + 1])
                i = j + 1
                continue
            out.append(c)
            i += 1
            continue
        m = DUNDER_RE.match(text, i)
        if m and not word_char(text, i - 1):
            out.append("`" + m.group(0) + "`")  # markdown would make __shared__ a bold "shared"
            i = m.end()
            continue
        m = ABBREV_RE.match(text, i)
        if m and not word_char(text, i - 1):
            # e.g. i.e. vs. cf. etc. do not end the first sentence (the brief description).
            out.append(m.group(1) + ".\\ ")
            i = m.end()
            continue
        if c in ESCAPE:
            out.append("\\" + c)
        elif text.startswith("::", i) and not word_char(text, i - 1):
            out.append("\\::")  # `>::step`: doxygen would read `::step` as an explicit link
            i += 2
            continue
        elif (text.startswith("..", i) and not text.startswith("...", i)
              and (i + 2 == n or text[i + 2] in " \t\n") and (i == 0 or text[i - 1] != ".")):
            # `0 .. n`: doxygen ends the brief at the first dot and, with `..` ending a line,
            # reads the second as an end-of-list marker (an error). A no-break space instead.
            out.append("..&nbsp;")
            i += 3 if i + 2 < n and text[i + 2] in " \t" else 2
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


def doc_block(lines, file_doc=False):
    """`   // text` -> `   /// text` for a block of comment lines, the text escaped.

    Consecutive text lines are escaped together (a code span or quote may span lines); a blank
    comment line ends a paragraph, and a markdown code block (indented 4 more spaces after a
    blank comment line) stays verbatim. With file_doc the block ends with `\\file`: it
    documents the file it is in.
    """
    out = [None] * len(lines)
    parts = []
    for line in lines:
        m = re.match(r"^(\s*)//(.*)$", line)
        parts.append((m.group(1), m.group(2)))
    run = []  # indices of the paragraph's text lines

    def flush():
        if run:
            escaped = escape_text("\n".join(parts[k][1] for k in run)).split("\n")
            for k, body in zip(run, escaped):
                out[k] = f"{parts[k][0]}///{body}"
            run.clear()

    in_code = False
    prev_blank = True
    for k, (indent, body) in enumerate(parts):
        if not body.strip():
            flush()
            prev_blank = True
            out[k] = f"{indent}///{body}"
            continue
        in_code = bool(re.match(r"^ {5,}\S", body)) and (in_code or prev_blank)
        prev_blank = False
        if in_code:
            flush()
            out[k] = f"{indent}///{body}"
        else:
            run.append(k)
    flush()
    if file_doc:
        out[-1] += " \\file"
    return out


class Scanner:
    """Tracks, line by line, whether the current position is at namespace/class scope.

    Braces are classified when they open: a `{` whose statement so far names namespace, class,
    struct, union or enum and has no parenthesis is a scope; any other (function bodies,
    initialisers, lambdas) is code. Strings, character literals, comments and preprocessor
    lines are skipped.
    """

    def __init__(self):
        self.stack = []  # True: scope, False: code
        self.parens = 0
        self.stmt = []  # the current statement's code, for classifying a `{`
        self.in_block_comment = False

    def at_scope(self):
        return all(self.stack) and self.parens == 0

    def feed(self, line):
        """Scans one line of code. Returns the column of a trailing `//` comment, or -1."""
        i = 0
        n = len(line)
        while i < n:
            if self.in_block_comment:
                j = line.find("*/", i)
                if j < 0:
                    return -1
                self.in_block_comment = False
                i = j + 2
                continue
            c = line[i]
            if line.startswith("//", i):
                return i
            if line.startswith("/*", i):
                self.in_block_comment = True
                i += 2
                continue
            if c == '"':
                m = re.match(r'R"([^(\s]*)\(', line[i:]) if i > 0 and line[i - 1] == "R" else None
                if m:  # raw string on one line
                    end = line.find(")" + m.group(1) + '"', i)
                    i = n if end < 0 else end + len(m.group(1)) + 2
                    continue
                i += 1
                while i < n and line[i] != '"':
                    i += 2 if line[i] == "\\" else 1
                i += 1
                self.stmt.append('""')
                continue
            if c == "'":
                if i > 0 and line[i - 1].isalnum() and not re.search(r"(^|\W)(u8|u|U|L)$", line[:i]):
                    i += 1  # a digit separator (1'000)
                    continue
                i += 1
                while i < n and line[i] != "'":
                    i += 2 if line[i] == "\\" else 1
                i += 1
                continue
            if c == "(":
                self.parens += 1
            elif c == ")":
                self.parens = max(0, self.parens - 1)
            elif c == "{":
                text = "".join(self.stmt)
                self.stack.append(bool(SCOPE_RE.search(text)) and "(" not in text
                                  and not text.rstrip().endswith("="))
                self.stmt = []
                i += 1
                continue
            elif c == "}":
                if self.stack:
                    self.stack.pop()
                self.stmt = []
                self.parens = 0
                i += 1
                continue
            elif c == ";":
                self.stmt = []
                i += 1
                continue
            self.stmt.append(c)
            i += 1
        self.stmt.append(" ")
        return -1


def keeps_plain(next_line):
    """Whether a comment block directly above `next_line` should stay an ordinary comment."""
    s = next_line.strip()
    if not s or s.startswith(("}", "/*", "#include", "#if", "#else", "#elif", "#endif", "#pragma",
                              "#error", "#undef", "static_assert", "using namespace")):
        return True
    if re.match(r"^(public|private|protected)\s*:", s):
        return True
    if re.match(r"^(inline\s+)?namespace\b", s):
        return True
    return False


def filter_source(lines):
    out = list(lines)
    sc = Scanner()
    i = 0
    n = len(lines)
    top = True  # the first comment block of the file is the file's documentation
    in_pp = False  # inside a preprocessor directive continued with a backslash
    while i < n:
        line = lines[i]
        stripped = line.strip()
        if in_pp or (stripped.startswith("#") and not sc.in_block_comment):
            in_pp = line.rstrip().endswith("\\")
            i += 1
            continue
        if stripped.startswith("//") and not stripped.startswith("///") and not sc.in_block_comment:
            j = i
            while j < n and lines[j].strip().startswith("//"):
                j += 1
            next_line = lines[j] if j < n else ""
            if top:
                out[i:j] = doc_block(lines[i:j], file_doc=True)
            elif sc.at_scope() and not keeps_plain(next_line):
                out[i:j] = doc_block(lines[i:j])
            top = False
            i = j
            continue
        if stripped:
            top = False
        was_scope = sc.at_scope()
        col = sc.feed(line)
        if col >= 0 and was_scope and sc.at_scope():
            code = line[:col].rstrip()
            body = line[col + 2:]
            if code.endswith((";", ",")) and not body.startswith("/"):
                out[i] = code + line[len(code):col] + "///<" + escape_text(body)
        i += 1
    return out


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    sys.stdout.write("\n".join(filter_source(lines)))


if __name__ == "__main__":
    main()
