#!/usr/bin/env python3
"""Every relative link and #anchor in the project's Markdown resolves.

    .ci/check_links.py                # the project's documents (what .ci/run checks)
    .ci/check_links.py FILE...        # these files; paths relative to the current directory

A link resolves when the file or directory it names exists (relative to the
file that holds it) and, for a `#anchor` into a Markdown file, when that file
has a heading whose GitHub slug is the anchor (or an explicit `<a id>` /
`<a name>`). Links to this repository's own files on GitHub
(`https://github.com/canary-injector/canary-injector/blob/main/PATH#anchor`,
as in the alerts' runbook URLs) are checked as repository paths, in any file
given. Other absolute URLs are not followed (no network). Code blocks and
code spans are not links.

Exit code 0 when everything resolves, 1 with one line per broken link
(`file:line: target: why`), 2 on bad usage. Standard library only.
"""

import os
import re
import sys

REPO_URL = "https://github.com/canary-injector/canary-injector/blob/main/"

# What .ci/run checks when no file is named, relative to the repository root.
DEFAULT_FILES = [
    "README.md",
    "CHANGELOG.md",
    "CONTRIBUTING.md",
    "SECURITY.md",
    "BENCHMARKS.md",
    "certs/README.md",
    "deploy/examples/README.md",
    "docs/*.md",
    "deploy/monitoring/prometheusrule.yaml",
    "Dockerfile",
]

FENCE = re.compile(r"^\s{0,3}(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target "title") and ![alt](target); the text may hold one level of [..].
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_HREF = re.compile(r"<a\s[^>]*href=\"([^\"]*)\"", re.IGNORECASE)
HTML_ANCHOR = re.compile(r"<a\s[^>]*(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
REPO_LINK = re.compile(re.escape(REPO_URL) + r"([^\s)\"'>]+)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def slug(heading):
    """GitHub's anchor for a heading's text: the rendered text (code span
    backticks, emphasis and link syntax gone), lowercased, every character
    that is not a letter, digit, space, `-` or `_` dropped, spaces made `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"(^|\s)_+|_+(\s|$)", r"\1\2", text)
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def outside_code(lines):
    """(line number, line) of the lines outside fenced code blocks, with code spans blanked."""
    fence = None
    for number, line in enumerate(lines, 1):
        match = FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
            elif match.group(1) == fence:
                fence = None
            continue
        if fence is None:
            yield number, CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)


def anchors(path, cache={}):
    """Every anchor a Markdown file defines: heading slugs (repeats get -1, -2, ...) and <a id>."""
    if path not in cache:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        seen, found = {}, set()
        for number, line in outside_code(lines):
            for name in HTML_ANCHOR.findall(line):
                found.add(name)
            if HEADING.match(line):
                # The heading's code spans count: read its text from the raw line.
                base = slug(HEADING.match(lines[number - 1]).group(2))
                n = seen.get(base, 0)
                seen[base] = n + 1
                found.add(base if n == 0 else "%s-%d" % (base, n))
        cache[path] = found
    return cache[path]


def check_target(source, target, root):
    """None when `target`, written in `source`, resolves; else the reason."""
    path, _, anchor = target.partition("#")
    if path:
        if path.startswith("/"):
            resolved = os.path.normpath(os.path.join(root, path.lstrip("/")))
        else:
            resolved = os.path.normpath(os.path.join(os.path.dirname(source), path))
        if not os.path.exists(resolved):
            return "no such file: %s" % os.path.relpath(resolved, root)
    else:
        resolved = source
    if anchor and resolved.endswith(".md") and os.path.isfile(resolved):
        if anchor not in anchors(resolved):
            return "no heading or anchor #%s in %s" % (anchor, os.path.relpath(resolved, root))
    return None


def links(path):
    """(line number, target) of every link in a file worth checking."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if path.endswith(".md"):
        for number, line in outside_code(lines):
            targets = INLINE_LINK.findall(line) + HTML_HREF.findall(line)
            match = REFERENCE_DEF.match(line)
            if match:
                targets.append(match.group(1))
            for target in targets:
                yield number, target
    else:
        for number, line in enumerate(lines, 1):
            for target in REPO_LINK.findall(line):
                yield number, REPO_URL + target


def check(files, root):
    problems = []
    for path in files:
        for number, target in links(path):
            if target.startswith(REPO_URL):
                local = "/" + target[len(REPO_URL):]
            elif not target or SCHEME.match(target):
                continue
            else:
                local = target
            reason = check_target(path, local, root)
            if reason:
                problems.append("%s:%d: %s: %s" % (os.path.relpath(path, root), number, target, reason))
    return problems


def main(argv):
    if any(a.startswith("-") for a in argv):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    if argv:
        root = os.getcwd()
        files = argv
    else:
        root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        import glob

        files = []
        for pattern in DEFAULT_FILES:
            matched = sorted(glob.glob(os.path.join(root, pattern)))
            if not matched:
                print("check_links: %s matches no file" % pattern, file=sys.stderr)
                return 2
            files += matched
    for path in files:
        if not os.path.isfile(path):
            print("check_links: no such file: %s" % path, file=sys.stderr)
            return 2
    problems = check([os.path.abspath(f) for f in files], root)
    for problem in problems:
        print(problem)
    if problems:
        print("%d broken link(s)" % len(problems), file=sys.stderr)
        return 1
    print("links: %d file(s), every relative link and anchor resolves" % len(files))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
