"""The README and the docs pages: size, links and the usage example's place (fast, no model)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
README_LIMIT = 13_000  # bytes: the README points to docs/ for depth
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "notebooks" / "README.md"]

# [text](target) or [text](target "title"); the text may hold `code` and nested brackets are rare.
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")


def _without_code(text: str) -> str:
    """The text without fenced code blocks and inline code spans, where brackets are not links."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def _relative_links(page: Path) -> list[str]:
    targets = LINK.findall(_without_code(page.read_text(encoding="utf-8")))
    return [t for t in targets
            if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith("#")]


def test_readme_is_short():
    size = README.stat().st_size
    assert size < README_LIMIT, (f"README.md is {size:,} bytes, over {README_LIMIT:,}: move "
                                 "detail into a docs/ page and link it")


def test_pages_exist():
    for page in PAGES:
        assert page.is_file(), f"{page.relative_to(ROOT)} is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert page.is_file(), f"{page.relative_to(ROOT)} is missing"
    broken = []
    for target in _relative_links(page):
        path = target.split("#", 1)[0].split("?", 1)[0]
        resolved = (page.parent / path).resolve()
        if not resolved.exists() or ROOT.resolve() not in (resolved, *resolved.parents):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files: {broken}"


def test_link_pattern_sees_links():
    """The link check must not pass by finding nothing."""
    text = "see [a](docs/a.md), [`b`](b.ipynb#top), [web](https://x.org), [here](#anchor)\n" \
           "```\n[not](in_code.md)\n```\n"
    assert LINK.findall(_without_code(text)) == ["docs/a.md", "b.ipynb#top", "https://x.org",
                                                 "#anchor"]
    assert _relative_links(README), "README.md has no relative links at all"


def test_readme_has_usage_example():
    text = README.read_text(encoding="utf-8")
    heading = re.search(r"^## Using the package[ \t]*$", text, re.MULTILINE)
    assert heading, "README.md lost its '## Using the package' heading"
    after = text[heading.end():]
    block = re.search(r"^```python\n(.+?)^```", after, re.MULTILINE | re.DOTALL)
    assert block, "no ```python block after '## Using the package'"
    next_heading = re.search(r"^## ", after, re.MULTILINE)
    assert next_heading is None or block.start() < next_heading.start(), \
        "the ```python block must sit in the 'Using the package' section"
    assert "from cgclora_lite" in block.group(1)


STUDIES = sorted((ROOT / "docs").glob("results*.json"))


@pytest.mark.parametrize("saved", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_committed_study_report_is_what_its_json_rebuilds(saved):
    """docs/results*.md are the study command's reports: every number traceable to the JSON beside."""
    import json

    from cgclora_lite.study import report

    assert saved.with_suffix(".md").read_text() == report(json.loads(saved.read_text()))


def test_the_committed_studies_are_found():
    assert ROOT / "docs" / "results.json" in STUDIES
