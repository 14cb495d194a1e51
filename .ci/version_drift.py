"""Print the packages whose installed version (pip freeze on stdin) differs from a tested list (argv[1])."""

import sys


def parse(lines):
    out = {}
    for line in lines:
        name, sep, version = line.strip().partition("==")
        if sep:
            out[name.lower().replace("_", "-")] = version
    return out


tested = parse(open(sys.argv[1]))
installed = parse(sys.stdin)
drift = [f"  {n}: {tested.get(n, '-')} -> {installed.get(n, '-')}"
         for n in sorted(set(tested) | set(installed)) if tested.get(n) != installed.get(n)]
print("\n".join(drift) if drift else "  none")
