#!/usr/bin/env python3
"""Where a firmware's flash goes: the bytes of .text attributed to the source file each
instruction came from (the innermost inlined location, from the ELF's line tables; build with
`debug = true`, as the firmware release profiles do).

    python3 scripts/flash-by-source.py ELF [ELF2]

With two ELFs, prints both side by side and the difference (what the second adds).
Needs `llvm-objdump` (apt-get install llvm).
"""
import collections
import re
import subprocess
import sys

INSN = re.compile(r"^\s*[0-9a-f]+:\s+((?:[0-9a-f]{2} ?)+)\s")
# Our crates by file; dependencies by crate; the standard library by file.
OURS = re.compile(r"/((?:core|adapters/serial|examples/firmware-[a-z]+|examples/firmware-common)/.*)$")
STD = re.compile(r"/rustc/[0-9a-f]+/library/([a-z_-]+/.*)$")
DEP = re.compile(r"registry/src/[^/]+/([^/]+)/")


def by_source(elf):
    out = subprocess.run(["llvm-objdump", "-d", "-l", "--section=.text", elf], capture_output=True, text=True, check=True).stdout
    sizes = collections.Counter()
    where = "?"
    for line in out.splitlines():
        if line.startswith("; /"):
            path = line[2:].rsplit(":", 1)[0]
            std, ours, dep = STD.search(path), OURS.search(path), DEP.search(path)
            where = f"rust: {std.group(1)}" if std else (ours or dep).group(1) if ours or dep else path
            where = where.replace("examples/firmware-pump/src/../../", "examples/")
        else:
            m = INSN.match(line)
            if m:
                sizes[where] += len(m.group(1).split())
    return sizes


def main():
    elves = sys.argv[1:]
    if not elves or len(elves) > 2:
        sys.exit(__doc__)
    tables = [by_source(e) for e in elves]
    keys = sorted(set().union(*tables), key=lambda k: -tables[-1][k])
    for k in keys:
        row = "".join(f"{t[k]:>8}" for t in tables)
        if len(tables) == 2:
            row += f"{tables[1][k] - tables[0][k]:>+8}"
        print(f"{row}  {k}")
    print("".join(f"{sum(t.values()):>8}" for t in tables) + "  total .text")


main()
