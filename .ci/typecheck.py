"""mypy over the source tree, each file under the name it is installed as.

setuptools installs common/ as fedgrpc.common, server/ as fedgrpc.server (and so on) by the
package-dir table in pyproject.toml. mypy names a file by its folders alone (common/codec.py would
be `common.codec`) and reads no such table, so this hands mypy each file of those packages with
its installed name, taken from that same table: no install and no tree of links are needed.

    python .ci/typecheck.py [MYPY OPTIONS] [-p fedgrpc.PACKAGE ...] [PATH ...]

Everything but `-p` of a package in the table goes to mypy unchanged; config, cache and messages
are mypy's own. Run it from the project root, where mypy finds its config in pyproject.toml.
The root's __init__.py (there for tools that resolve `from ..common import x` by path) is
stepped over when naming other files: tests/conftest.py stays `conftest`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from mypy import util
from mypy.fscache import FileSystemCache
from mypy.main import process_options, run_build
from mypy.modulefinder import BuildSource, matches_exclude

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the dev venv runs 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def installed_modules(pyproject: Path) -> dict[str, list[tuple[str, Path]]]:
    """Each package of the table -> its modules as (installed name, file), as setuptools lays them."""
    table = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]
    package_dir: dict[str, str] = table.get("package-dir", {})
    found: dict[str, list[tuple[str, Path]]] = {}
    for package in table["packages"]:
        keys = [key for key in package_dir if key in ("", package) or package.startswith(key + ".")]
        key = max(keys, key=len) if keys else None
        folder = pyproject.parent / package_dir[key] if key is not None else pyproject.parent
        rest = package[len(key) :].lstrip(".") if key else package
        folder = folder.joinpath(*rest.split(".")) if rest else folder
        found[package] = [
            (package if path.stem == "__init__" else f"{package}.{path.stem}", path)
            for path in sorted(folder.glob("*.py"))
        ]
    return found


def split_packages(args: list[str], known: set[str]) -> tuple[list[str], list[str]]:
    """Take the `-p NAME` of packages in the table out of args: mypy could not find them."""
    passed: list[str] = []
    asked: list[str] = []
    items = iter(args)
    for arg in items:
        if arg in ("-p", "--package"):
            name = next(items, "")
        elif arg.startswith("--package="):
            name = arg.split("=", 1)[1]
        elif arg.startswith("-p") and len(arg) > 2 and not arg.startswith("--"):
            name = arg[2:]
        else:
            passed.append(arg)
            continue
        if any(package == name or package.startswith(name + ".") for package in known):
            asked.append(name)
        else:
            passed += ["-p", name]
    return passed, asked


def local_source(path: str) -> BuildSource:
    """A file outside the package (tests/, bench/), named as mypy names it by crawling up folders
    that hold an __init__.py, but stopping below the root: the root's own __init__.py only marks
    common/, server/ and client/ as siblings for tools that read the tree, it is no package."""
    file = Path(path).resolve()
    parts = [] if file.stem == "__init__" else [file.stem]
    folder = file.parent
    while folder != ROOT and (folder / "__init__.py").exists():
        parts.insert(0, folder.name)
        folder = folder.parent
    return BuildSource(path, ".".join(parts), base_dir=str(folder))


def installed_sources(
    given: list[BuildSource],
    modules: dict[str, list[tuple[str, Path]]],
    asked: list[str],
    exclude: list[str],
    fscache: FileSystemCache,
) -> list[BuildSource]:
    """mypy's sources for the paths given, plus the packages asked for, all under installed names."""
    by_path = {str(path.resolve()): name for files in modules.values() for name, path in files}
    chosen: dict[str, BuildSource] = {}
    for source in given:  # a path given that lies in the package keeps its installed name
        if source.path is None:
            chosen[source.module] = source
            continue
        key = str(Path(source.path).resolve())
        name = by_path.get(key)
        chosen[key] = BuildSource(source.path, name) if name else local_source(source.path)
    for package, files in modules.items():
        if any(package == name or package.startswith(name + ".") for name in asked):
            for name, path in files:
                relative = os.path.relpath(path)
                if not matches_exclude(relative, exclude, fscache, False):
                    chosen.setdefault(str(path.resolve()), BuildSource(relative, name))
    return list(chosen.values())


def main(args: list[str]) -> int:
    t0 = time.time()
    modules = installed_modules(ROOT / "pyproject.toml")
    passed, asked = split_packages(args, set(modules))
    fscache = FileSystemCache()
    given, options = process_options(passed, fscache=fscache, require_targets=not asked)
    sources = installed_sources(given, modules, asked, options.exclude, fscache)
    _, messages, blockers = run_build(sources, options, fscache, t0, sys.stdout, sys.stderr)
    formatter = util.FancyFormatter(sys.stdout, sys.stderr, options.hide_error_codes)
    n_errors, n_notes, n_files = util.count_stats(messages)
    if n_errors:
        print(formatter.format_error(n_errors, n_files, len(sources), blockers=blockers,
                                     use_color=options.color_output))  # fmt: skip
    else:
        print(formatter.format_success(len(sources), options.color_output))
    return (2 if blockers else 1) if messages and n_notes < len(messages) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
