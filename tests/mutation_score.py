"""Mutation scores per module from mutmut's results (``make mutation`` prints them).

    mutmut run $(python tests/mutation_score.py --patterns)   # the mutants in SCOPE
    python tests/mutation_score.py                             # their scores, per module

``SCOPE`` is what the scores cover: the functions that produce the experiment's numbers (task
routing; parsing and scoring answers; the schedule and the step split; the task-balanced sampler;
the budget rule and the seesaw table). mutmut mutates whole files; the mutants of functions that
drive a real training run would each need one (those run end to end in the slow tests), and
torchrun's sharding is tested by launching torchrun, which mutmut's test selection cannot follow.

Reads ``mutants/cgclora_lite/<module>.py.meta`` (mutmut 3) and prints a Markdown table: mutants,
killed (a test failed, crashed or timed out), survived (every test passed), not covered (no selected
test runs the function), and the score = killed / mutants. Survivors: ``mutmut show <name>``.
"""

import collections
import fnmatch
import json
import sys
from pathlib import Path


SCOPE = {  # module: functions (methods as Class.method; a class name alone: all its methods)
    "routing": ["TaskRouter"],
    "evaluate": ["_is_word_char", "first_word", "parse_label", "label_scores", "_is_punctuation",
                 "normalize_answer", "exact_match", "token_f1", "_is_cjk", "RougeTokenizer",
                 "rouge_l_each", "rouge_l", "score_task", "_check_lengths"],
    "train": ["TrainConfig", "proportional_steps", "lr_factor", "answer_tokens"],
    "data": ["TaskBalancedSampler"],
    "experiment": ["method_config", "method_clusters", "cluster_batches", "train_config",
                   "_scored", "seesaw_table"],
}


def patterns() -> list[str]:
    """mutmut's mutant-name globs for SCOPE (a method's mutants: ``module.xǁClassǁmethod__mutmut_N``)."""
    globs = []
    for module, names in SCOPE.items():
        for name in names:
            if name[0].isupper():
                globs.append(f"cgclora_lite.{module}.xǁ{name}ǁ*")
            else:
                globs.append(f"cgclora_lite.{module}.x_{name}__mutmut_*")
    return globs


def in_scope(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, glob) for glob in patterns())


def scores(root: Path = Path("mutants")) -> dict[str, collections.Counter]:
    from mutmut.stats import status_by_exit_code

    by_module = {}
    for meta in sorted(root.glob("cgclora_lite/**/*.py.meta")):
        results = json.loads(meta.read_text())["exit_code_by_key"]
        counts = collections.Counter(status_by_exit_code[code] for key, code in results.items() if in_scope(key))
        if counts:
            by_module[meta.name.removesuffix(".py.meta")] = counts
    return by_module


def table(by_module: dict[str, collections.Counter]) -> str:
    rows = ["| module | mutants | killed | survived | not covered | not run | score | score of those run |",
            "|---|---|---|---|---|---|---|---|"]
    for module, counts in by_module.items():
        total = sum(counts.values())
        killed = counts["killed"] + counts["timeout"] + counts["segfault"]
        rows.append(f"| {module}.py | {total} | {killed} | {counts['survived']} | {counts['no tests']} "
                    f"| {counts['not checked']} | {killed / total:.0%} "
                    f"| {killed / max(total - counts['not checked'], 1):.0%} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:] == ["--patterns"]:
        print(" ".join(patterns()))
        sys.exit()
    found = scores()
    if not found:
        sys.exit("no mutmut results under mutants/: run `make mutation` (or `mutmut run`) first")
    print(table(found))
