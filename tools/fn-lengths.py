#!/usr/bin/env python3
"""Lists the functions of a Rust tree longer than a limit (lines from `fn` to its closing brace),
longest first, leaving out `#[cfg(test)]` modules: the figure the structure reviews count.

    python3 tools/fn-lengths.py 80 src
"""
import os
import re
import sys

FN = re.compile(r'^(\s*)(pub(\([^)]*\))?\s+)?(async\s+)?(const\s+)?(unsafe\s+)?fn\s+(\w+)')


def long_fns(limit, root):
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.endswith('.rs'):
                continue
            path = os.path.join(dirpath, name)
            lines = open(path, encoding='utf-8').read().split('\n')
            # Tests live in a `#[cfg(test)] mod tests` at the end of a file.
            for cut, line in enumerate(lines):
                if line.strip() == '#[cfg(test)]':
                    lines = lines[:cut]
                    break
            i = 0
            while i < len(lines):
                m = FN.match(lines[i])
                if not m:
                    i += 1
                    continue
                indent, j = m.group(1), i
                while j < len(lines) and not lines[j].rstrip().endswith(('{', ';')):
                    j += 1
                if j >= len(lines) or lines[j].rstrip().endswith(';'):
                    i = j + 1
                    continue
                k = j + 1
                while k < len(lines) and lines[k].rstrip() != indent + '}':
                    k += 1
                if k - i + 1 > limit:
                    out.append((k - i + 1, path, m.group(7)))
                i += 1
    return sorted(out, reverse=True)


if __name__ == '__main__':
    for n, path, fn in long_fns(int(sys.argv[1]), sys.argv[2]):
        print(n, path, fn)
