"""Lint and hygiene: ruff (code and notebooks), notebooks without outputs, no secrets."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tests.conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("ruff")
    return subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_check():
    out = ruff("check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format():
    out = ruff("format", "--check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_all_seven_notebooks_exist():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean_and_well_formed(path):
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), (
        "strip outputs"
    )
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    source = "\n".join(c.source for c in nb.cells)
    assert "input(" not in source.replace("getpass", ""), "notebooks never call input()"
    first = nb.cells[0].source
    assert first.startswith("# "), "H1 title first"
    assert f"Part {int(path.name[:2])} of 7" in source
    assert re.search(r"^## (\d+\. )?Clean up", source, re.M), "a Clean up section"


SECRET_PATTERNS = [
    re.compile(r"-----BEGIN (RSA |EC |OPENSSH )?PRIVATE KEY-----"),
    re.compile(r"ocid1\.(tenancy|user|compartment)\.oc1\.\.[a-z0-9]{40,}"),
    re.compile(r"(?i)auth[_-]?token\s*[:=]\s*['\"][A-Za-z0-9+/;:<>()\[\]._-]{16,}['\"]"),
]


def test_no_secrets_in_the_tree():
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    hits = []
    for name in files.stdout.split():
        path = ROOT / name
        if not path.is_file() or path.suffix in {".png"}:
            continue
        text = path.read_text(errors="ignore")
        hits += [f"{name}: {p.pattern}" for p in SECRET_PATTERNS if p.search(text)]
    assert not hits, hits


def test_generated_files_are_not_tracked():
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    tracked = [
        f
        for f in files.stdout.split()
        if re.search(r"\.(onnx|h5|pem|key)$|(^|/)(vocab\.json|merges\.txt)$", f)
    ]
    assert not tracked, tracked


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_no_large_files_outside_images():
    """Profiles, data and outputs stay out of the tree (a 64 MB profile was once committed)."""
    big = [
        name
        for name in tracked_files()
        if not name.startswith("images/")
        and (ROOT / name).is_file()
        and (ROOT / name).stat().st_size > 2 * 2**20
    ]
    assert not big, big


def test_no_tracked_symlinks():
    """Checkouts without symlink support (Windows) get a text file instead of the target."""
    out = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True)
    assert [line for line in out.stdout.splitlines() if line.startswith("120000")] == []


#: Names of files outside this repository that notes once pointed to.
NOT_IN_REPO = re.compile(r"REFERENCE\.md|see REFERENCE|CONVENTIONS\.md|\bshared/seeds\b")


def test_no_references_to_files_not_in_the_repository():
    hits = []
    for name in tracked_files():
        path = ROOT / name
        if not path.is_file() or path.suffix == ".png" or name == "tests/test_lint.py":
            continue
        hits += [
            f"{name}: {m.group(0)}" for m in NOT_IN_REPO.finditer(path.read_text(errors="ignore"))
        ]
    assert not hits, hits
