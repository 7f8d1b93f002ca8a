"""Every number a notebook's text quotes is one its stored outputs print (fast, no model).

A reader on GitHub or in Colab's preview sees the text beside the stored outputs, so a number in
the prose that no output shows (a run since re-executed, a number from another mode) misleads.
Checked: every decimal with at least two digits after the point in a Markdown cell, outside
math (``$...$``) and code spans, must appear verbatim in the text of the notebook's stored outputs
(streams, ``text/plain``, ``text/html``). Figures are images and cannot be read here: the
notebooks print the numbers their text quotes.
"""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+\.\d{2,}(?!\w|\.\d)")
ARXIV = re.compile(r"\b\d{4}\.\d{4,5}\b")

# Numbers that are inputs, not results: each with the reason it need not be printed.
NOT_RESULTS = {
    "04_gate_explorer.ipynb": {"0.25", "0.75"},  # conflict settings to try on the toy panel's slider
}


def quoted_numbers(markdown: str) -> list[str]:
    """The decimals of a Markdown text, outside math, code spans and arXiv identifiers."""
    text = re.sub(r"\$\$.*?\$\$|\$[^$]*\$", " ", markdown, flags=re.DOTALL)
    text = ARXIV.sub(" ", re.sub(r"`[^`]*`", " ", text))
    return [m.group().lstrip("+") for m in NUMBER.finditer(text)]


def stored_text(notebook: dict) -> str:
    """Every stored output of the notebook as text."""
    parts = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            parts.append("".join(output.get("text", "")))
            for kind, value in output.get("data", {}).items():
                if kind.startswith("text/"):
                    parts.append("".join(value))
    return "\n".join(parts)


def test_quoted_numbers_are_found_outside_math_code_and_arxiv_ids():
    text = "Accuracy 0.432 [0.406, +0.459]; $w = 0.25$; `lr=0.001`; arXiv 2402.01684; step 1.5; -0.016."
    assert quoted_numbers(text) == ["0.432", "0.406", "0.459", "-0.016"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_number_in_the_text_is_in_the_stored_outputs(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    outputs = stored_text(notebook)
    missing = [(i, number) for i, cell in enumerate(notebook["cells"]) if cell["cell_type"] == "markdown"
               for number in quoted_numbers("".join(cell["source"]))
               if number not in outputs and number not in NOT_RESULTS.get(path.name, set())]
    assert not missing, f"numbers in {path.name}'s text that no stored output prints (cell, number): {missing}"
