"""Reading weight: what a learner takes in one sitting (issue 23).

Counted as the before-stop hook counts: words split on whitespace, the README's words before
the first ``make run`` / ``make test``, and the markdown cells of ``notebooks/0*.ipynb``.
Long reference material belongs in ``docs/``, which has no budget.
"""

from __future__ import annotations

import ast
import json
import re

import pytest

from tests.conftest import ROOT

README_WORDS = 1800
README_WORDS_BEFORE_FIRST_COMMAND = 400
NOTEBOOK_WORDS_IN_ALL = 6000
NOTEBOOK_WORDS_EACH = 1100
MARKDOWN_CELL_WORDS = 250
# The parameters cell holds what a learner sets; the rest goes to an "advanced" cell below it.
PARAMETERS_SETTINGS = 8
PARAMETERS_LINES = 12

NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb"))


def words(text: str) -> int:
    return len(text.split())


def markdown_cells(path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]


def readme_counts() -> tuple[int, int]:
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"make (run|test)", readme)
    before = words(readme[: first.start()]) if first else words(readme)
    return words(readme), before


def test_print_word_counts() -> None:
    """Prints every count (run with -s to read them); fails only if a budget below does."""
    total, before = readme_counts()
    print(f"\nREADME: {total} words, {before} before the first make command")
    for doc in sorted((ROOT / "docs").glob("*.md")):
        print(f"docs/{doc.name}: {words(doc.read_text())} words")
    for path in NOTEBOOKS:
        cells = markdown_cells(path)
        print(
            f"{path.name}: {sum(map(words, cells))} words of markdown, largest cell {max(map(words, cells))}"
        )
    print(f"notebooks in all: {sum(words(c) for p in NOTEBOOKS for c in markdown_cells(p))}")


def test_readme_within_budget() -> None:
    total, before = readme_counts()
    assert total <= README_WORDS, f"README is {total} words (budget {README_WORDS})"
    assert before <= README_WORDS_BEFORE_FIRST_COMMAND, (
        f"{before} words before the first make command (budget {README_WORDS_BEFORE_FIRST_COMMAND})"
    )


def test_notebooks_within_budget_in_all() -> None:
    total = sum(words(c) for p in NOTEBOOKS for c in markdown_cells(p))
    assert total <= NOTEBOOK_WORDS_IN_ALL, (
        f"the notebooks hold {total} words of markdown (budget {NOTEBOOK_WORDS_IN_ALL})"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_within_budget(path) -> None:
    cells = markdown_cells(path)
    total = sum(map(words, cells))
    assert total <= NOTEBOOK_WORDS_EACH, f"{total} words of markdown (budget {NOTEBOOK_WORDS_EACH})"
    over = [(words(c), c.splitlines()[0][:60]) for c in cells if words(c) > MARKDOWN_CELL_WORDS]
    assert not over, f"markdown cells over {MARKDOWN_CELL_WORDS} words: {over}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cell_holds_what_a_learner_sets(path) -> None:
    """At most eight settings (top-level assignments) in at most twelve non-blank lines."""
    cells = json.loads(path.read_text())["cells"]
    (cell,) = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    source = "".join(cell["source"])
    settings = [n for n in ast.parse(source).body if isinstance(n, (ast.Assign, ast.AnnAssign))]
    lines = [line for line in source.splitlines() if line.strip()]
    assert len(settings) <= PARAMETERS_SETTINGS, (
        f"{len(settings)} settings in the parameters cell (at most {PARAMETERS_SETTINGS}): "
        "move what a learner rarely sets to the 'advanced' cell below it"
    )
    assert len(lines) <= PARAMETERS_LINES, f"{len(lines)} lines (at most {PARAMETERS_LINES})"
