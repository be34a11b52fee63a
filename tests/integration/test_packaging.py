"""The wheel and the sdist, as ``scripts/dev.py build`` makes them (issue 12).

Opens both and checks what a user gets: the package with its example DAGs, ``py.typed``,
the license, the entry points and project URLs, one version everywhere; and what must not
be there: tests, virtualenvs, local settings, keys. ``dev.py build`` itself runs
``twine check --strict`` and fails on a warning.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from airflow_papertrail import __version__
from airflow_papertrail.example_dags import EXAMPLE_DAGS
from airflow_papertrail.get_provider_info import get_provider_info

REPO = Path(__file__).resolve().parents[2]
#: Nothing of these may be shipped: test code, environments, caches, local settings, secrets.
FORBIDDEN = re.compile(
    r"(^|/)(tests?|\.venv[^/]*|\.tools|\.demo|site|dist|__pycache__|\.git)(/|$)|\.env$|\.pem$|\.key$"
)


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "dev.py"), "build", "--out-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASSED") == 2, proc.stdout  # twine check --strict, both files
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_wheel_contents(dists):
    wheel = dists["wheel"]
    assert wheel.name == f"airflow_provider_papertrail-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = f"airflow_provider_papertrail-{__version__}.dist-info"
        metadata = Parser().parsestr(zf.read(f"{info}/METADATA").decode())
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        license_text = zf.read(f"{info}/licenses/LICENSE").decode()
    for name in EXAMPLE_DAGS:
        assert f"airflow_papertrail/example_dags/{name}" in names
    for needed in (
        "airflow_papertrail/__init__.py",
        "airflow_papertrail/py.typed",
        "airflow_papertrail/example_dags/__main__.py",
        "airflow_papertrail/plugins/papertrail.py",
        "airflow_papertrail/testing/emulator.py",  # papertrail-emulator, a console script
    ):
        assert needed in names
    assert not [n for n in names if FORBIDDEN.search(n)]
    assert "Apache License" in license_text and "Version 2.0" in license_text
    assert metadata["Version"] == __version__
    assert metadata["License-Expression"] == "Apache-2.0"
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL"))
    assert {"Homepage", "Documentation", "Source", "Changelog"} <= set(urls)
    assert all(u.startswith("https://") for u in urls.values())
    assert "provider_info = airflow_papertrail.get_provider_info:get_provider_info" in entry_points
    assert "papertrail = airflow_papertrail.plugins.papertrail:PapertrailPlugin" in entry_points
    assert "papertrail-emulator = airflow_papertrail.testing.emulator:main" in entry_points
    assert "papertrail = airflow_papertrail.cli:main" in entry_points
    # The long description is the README, whose links must work on an index page.
    assert "Use it in your Airflow" in metadata.get_payload()


def test_sdist_contents(dists):
    with tarfile.open(dists["sdist"]) as tf:
        names = [m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name]
    for needed in ("pyproject.toml", "README.md", "LICENSE", "airflow_papertrail/py.typed", "docs/changelog.md"):
        assert needed in names
    for name in EXAMPLE_DAGS:
        assert f"dags/{name}" in names and f"airflow_papertrail/example_dags/{name}" in names
    assert not [n for n in names if FORBIDDEN.search(n) or n.startswith(("benchmarks/", "docker/", "docs/img/"))]


def test_one_version_everywhere():
    assert get_provider_info()["versions"][0] == __version__
    changelog = (REPO / "docs" / "changelog.md").read_text(encoding="utf-8")
    first = re.search(r"^## (\S+)", changelog, re.M)
    assert first and first.group(1) == __version__, "the changelog's newest entry is not the package version"
    from importlib.metadata import version

    assert version("airflow-provider-papertrail") == __version__  # pyproject reads it from __init__.py
    assert 'dynamic = ["version"]' in (REPO / "pyproject.toml").read_text()


def test_readme_links_work_on_an_index_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    relative = [m for m in re.findall(r"\]\(([^)]+)\)", readme) if not m.startswith(("https://", "http://", "#"))]
    assert not relative, f"relative links break on an index page: {relative}"
