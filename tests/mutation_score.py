"""Mutation scores per module from mutmut's results (``make mutation`` prints them).

    python tests/mutation_score.py            # after `mutmut run`, in the repository root

Reads ``mutants/cgclora_lite/<module>.py.meta`` (mutmut 3) and prints a Markdown table: mutants,
killed (a test failed, crashed or timed out), survived (every test passed), not covered (no selected
test runs the function), and the score = killed / mutants. Survivors: ``mutmut show <name>``.
"""

import collections
import json
import sys
from pathlib import Path


def scores(root: Path = Path("mutants")) -> dict[str, collections.Counter]:
    from mutmut.stats import status_by_exit_code

    by_module = {}
    for meta in sorted(root.glob("cgclora_lite/**/*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"].values()
        by_module[meta.name.removesuffix(".py.meta")] = collections.Counter(
            status_by_exit_code[code] for code in codes)
    return by_module


def table(by_module: dict[str, collections.Counter]) -> str:
    rows = ["| module | mutants | killed | survived | not covered | not run | score |",
            "|---|---|---|---|---|---|---|"]
    for module, counts in by_module.items():
        total = sum(counts.values())
        killed = counts["killed"] + counts["timeout"] + counts["segfault"]
        rows.append(f"| {module}.py | {total} | {killed} | {counts['survived']} | {counts['no tests']} "
                    f"| {counts['not checked']} | {killed / total:.0%} |")
    return "\n".join(rows)


if __name__ == "__main__":
    found = scores()
    if not found:
        sys.exit("no mutmut results under mutants/: run `make mutation` (or `mutmut run`) first")
    print(table(found))
