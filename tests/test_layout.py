"""The package's layout and pins: backbones stand alone, the wheel holds every sub-package, and what the
requirements pin is what is installed and what the bundles' metadata.json declare."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from medtuning.bundles.export import bundle_names, metadata_drift

from .conftest import REPO


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports, relative imports resolved inside the ``medtuning`` package."""
    package = ["medtuning", *path.parent.relative_to(REPO).parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            names.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_backbones_do_not_import_the_machinery_that_attaches_to_them():
    for path in sorted((REPO / "networks" / "backbones").glob("*.py")):
        for name in imported_modules(path):
            assert not re.match(r"medtuning\.networks\.(efficiency|pet|tools|models|decoders)\b", name), (path, name)


def test_efficiency_and_pet_import_no_tools():
    for folder in ("efficiency", "pet"):
        for path in sorted((REPO / "networks" / folder).glob("*.py")):
            assert not any(n.startswith("medtuning.networks.tools") for n in imported_modules(path)), path


def test_every_sub_package_is_in_the_wheel():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {f"medtuning.{k.split('.', 1)[1]}" if "." in k else k: v for k, v in config["package-dir"].items()}
    expected = {"medtuning"}
    for name, folder in folders.items():
        for init in (REPO / folder).rglob("__init__.py"):
            expected.add(".".join([name, *init.parent.relative_to(REPO / folder).parts]))
    assert set(config["packages"]) == expected


def requirement_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line} is not pinned"
            pins[name.lower()] = version
    return pins


def test_requirements_pin_what_is_installed():
    pins = requirement_pins(REPO / "requirements.txt") | requirement_pins(REPO / "requirements-dev.txt")
    installed = {name: importlib.metadata.version(name).split("+")[0] for name in pins}
    assert installed == pins, "install with the README's command (pip install -r requirements-dev.txt -e .)"


def test_pyproject_names_what_the_requirements_pin():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ ]", d)[0].lower() for d in project["dependencies"]}
    assert names == set(requirement_pins(REPO / "requirements.txt"))


def test_bundle_metadata_declares_what_is_installed():
    assert metadata_drift(bundle_names()) == [], "after a tested upgrade: medtuning-export --sync-metadata"
    pins = requirement_pins(REPO / "requirements.txt")
    for name in bundle_names():
        meta = json.loads((REPO / "bundles" / name / "configs" / "metadata.json").read_text())
        for package, version in meta["required_packages_version"].items():
            if package != "medtuning":
                assert pins.get(package.lower()) == version, (name, package)


def test_ctrl_c_ends_every_process_a_test_started(tmp_path):
    """Ctrl-C at a terminal (SIGINT to the foreground process group) during a test whose child ignores SIGINT and
    waits on a grandchild that ignores it too: pytest stops and neither process lives on."""
    pid_file = tmp_path / "grandchild.pid"
    grandchild = ("import os, signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                  f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)")
    child = (f"import signal, subprocess, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
             f"subprocess.Popen([sys.executable, '-c', {grandchild!r}]).wait()")
    (tmp_path / "test_waits.py").write_text(
        f"import subprocess, sys\n\ndef test_waits():\n    subprocess.run([sys.executable, '-c', {child!r}])\n")
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "tests.processes", "-p", "no:cacheprovider",
                            str(tmp_path / "test_waits.py")], cwd=REPO, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        grandchild_pid = int(pid_file.read_text())
        os.killpg(run.pid, signal.SIGINT)
        output = run.communicate(timeout=120)[0].decode()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert "KeyboardInterrupt" in output, output
    time.sleep(0.5)
    state = Path(f"/proc/{grandchild_pid}/stat")
    assert not state.exists() or state.read_text().rsplit(")", 1)[1].split()[0] == "Z", "the grandchild lives on"


def test_documentation_links_resolve():
    pages = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").rglob("*.md")),
             *sorted((REPO / "bundles").glob("*/docs/README.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.relative_to(REPO)}: {target} does not exist"


def test_readme_commands_are_the_ones_ci_and_the_demo_test_run():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    test_command = "python -m pip install -r requirements-dev.txt -e . && python -m pytest -q"
    assert test_command in blocks[2] and "python -m pytest -q" in (REPO / ".ci" / "run").read_text()
    demo = blocks[1].strip()
    assert demo.startswith("python -m pip install -r requirements.txt -e . && python -m monai.bundle run --config_file ")
    assert "bundles/medtuning_brats/configs/train.json','bundles/medtuning_brats/configs/demo.json'" in demo
