"""Build a MONAI Label environment that serves and trains this project's bundles, in its own virtual environment.

    python -m medtuning.bundles.monailabel_env ~/monailabel-env                  # GPU machine, or CPU (CUDA build)
    python -m medtuning.bundles.monailabel_env ~/monailabel-env \\
        --torch-index https://download.pytorch.org/whl/cpu                         # CPU machine, CPU-only torch

MONAI Label pins its own stack (numpy < 2, its pytorch-ignite, jsonschema 3, ...), which the versions this
project is tested with do not share, so the two live in separate environments: a bundle goes to MONAI Label as
an exported bundle (``medtuning-export NAME --full``), which carries this project's code in its ``scripts/`` and
needs no medtuning install. This command installs, in one resolver run, torch with a matching torchvision (MONAI
Label imports torchvision; PyPI's torchvision does not load beside a torch from another build), MONAI and MONAI
Label at the versions below, and the pins MONAI Label needs to start (``pydicom`` 2: ``pydicom-seg`` imports a
module pydicom 3 removed, with the ``dicomweb-client`` and ``pynetdicom`` releases that accept it); then the
packages the bundles' metadata lists that are still missing, at the bundles' versions, never changing one MONAI
Label installed (those that differ are reported). ``pip check`` ends it. Nothing else is fetched at run time:
start the server offline with ``--conf zoo_source github --conf sam2 false``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import venv
from pathlib import Path

MONAILABEL = "monailabel==0.8.5"
TORCH = ("torch==2.14.1", "torchvision==0.29.1")  # a released pair: torchvision's operators match its torch
STARTS = ("pydicom<3", "dicomweb-client<0.60", "pynetdicom<3")  # what MONAI Label 0.8.5 needs to import


def bundle_requirements() -> dict[str, str]:
    """The packages (name -> version) the bundles' metadata.json files list, as their exports do."""
    from .common import bundle_source
    from .export import bundle_names

    wanted: dict[str, str] = {}
    for name in bundle_names():
        meta = json.loads((bundle_source(name) / "configs" / "metadata.json").read_text())
        wanted.update({k: v for k, v in meta["required_packages_version"].items() if k != "medtuning"})
        wanted["monai"] = meta["monai_version"]
    return wanted


def pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", *args], check=True)


def installed(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], check=True, capture_output=True,
                         text=True).stdout
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(out)}


def build(target: Path, torch_index: str | None = None, quiet: bool = True) -> Path:
    """Create (or complete) the environment at ``target``; return its Python."""
    if not (target / "bin" / "python").exists():
        venv.EnvBuilder(with_pip=True).create(target)
    python = target / "bin" / "python"
    q = ["-q"] if quiet else []
    wanted = bundle_requirements()
    torch_args = [*q, "install", *TORCH] + (["--index-url", torch_index] if torch_index else [])
    pip(python, *torch_args)
    pip(python, *q, "install", *TORCH, f"monai=={wanted.pop('monai')}", MONAILABEL, *STARTS)
    have = installed(python)
    missing = [f"{name}=={version}" for name, version in wanted.items() if name.lower() not in have]
    if missing:
        pip(python, *q, "install", "--no-deps", *missing)
    differ = {name: (version, have[name.lower()]) for name, version in wanted.items()
              if name.lower() in have and have[name.lower()] != version}
    for name, (ours, theirs) in sorted(differ.items()):
        print(f"kept MONAI Label's {name} {theirs} (the bundles are tested with {ours})")
    pip(python, "check")
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medtuning.bundles.monailabel_env", description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="folder of the new virtual environment")
    parser.add_argument("--torch-index", help="the package index for torch and torchvision (e.g. PyTorch's CPU index)")
    parser.add_argument("--verbose", action="store_true", help="show pip's output")
    args = parser.parse_args(argv)
    try:
        python = build(args.target.expanduser().resolve(), args.torch_index, quiet=not args.verbose)
    except subprocess.CalledProcessError as error:
        print(f"error: {' '.join(map(str, error.cmd))} failed (exit {error.returncode})", file=sys.stderr)
        return 1
    # the monailabel command runs the `python` it finds first: the environment's, once activated
    print(f"MONAI Label environment: {python.parent.parent}\n"
          f"  export MEDTUNING_MONAILABEL_PYTHON={python}   # the tests' real-server check uses it\n"
          f"  source {python.parent}/activate\n"
          f"  monailabel apps --download --name monaibundle --output apps   # copies the app shipped in the wheel\n"
          f"  monailabel start_server --app apps/monaibundle --studies STUDIES --conf models BUNDLE "
          f"--conf zoo_source github --conf sam2 false")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
