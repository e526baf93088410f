"""Export a bundle as the MONAI model zoo lays one out, ready to share: ``OUT/NAME_vX.Y.Z.zip``.

    python -m medtuning.bundles.export medtuning_brats --out dist/            # the bundle's own models/
    python -m medtuning.bundles.export medtuning_brats --out dist/ --models work/demo/models --full
    python -m medtuning.bundles.export --sizes                                # paper-size files, full vs tuned-only

The zip holds ``NAME/`` with ``configs/`` (the code references point at ``scripts``), ``scripts/`` (a copy of this
package's code, so nothing but the packages ``metadata.json`` names is needed), ``models/``, ``docs/`` (README in
the zoo's sections, ``data_license.txt``) and ``LICENSE``. By default ``models/`` holds only what was tuned
(``model.safetensors``) plus the plan and the network settings; ``large_files.yml`` names the frozen pretrained
backbone (file, sha256, where to get it), which loading checks. A model trained without a pretrained file has
random frozen weights that exist nowhere else, so it ships whole (``model.pt``), as ``--full`` ships any model.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ..preprocessing.io import DataError, atomic_path
from .common import (NETWORK_FILE, PACKAGE, TUNED_FILE, build_bundle_network, bundle_root, bundle_source,
                     saved_network_settings)

SUBPACKAGES = ("networks", "preprocessing", "bundles")
# known releases of the pretrained backbones the bundles are built for: where a user gets each file
BACKBONE_RELEASES = {
    "ViT-B_16.npz": "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz",
    "swin_tiny_patch4_window7_224.pth":
        "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth",
    "model_swinvit.pt": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/model_swinvit.pt",
    "ViT-B-16.pt": "https://openaipublic.azureedge.net/clip/models/"
                   "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "mae_pretrain_vit_base.pth": "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth",
    "vit-b-300ep.pth.tar": "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
    "sam_vit_b_01ec64.pth": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "dinov2_vitb14_pretrain.pth": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
    "dinov2_vitb14_reg4_pretrain.pth":
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14_reg4/dinov2_vitb14_reg4_pretrain.pth",
    "clip_driven_universal_swin_unetr.pth":
        "https://huggingface.co/ljwztc/CLIP-Driven-Universal-Model/resolve/main/clip_driven_universal_swin_unetr.pth",
}
DATA_LICENSES = {
    "brats": "BraTS 2019/2020 data (https://www.med.upenn.edu/cbica/brats2020/data.html) are provided by the "
             "challenge organisers for research use under their data usage agreement; cite the BraTS reference "
             "papers listed there in any publication.",
    "kits19": "KiTS19 data (https://github.com/neheller/kits19) are licensed under CC BY-NC-SA 4.0 "
              "(https://creativecommons.org/licenses/by-nc-sa/4.0/); cite Heller et al. 2019/2021.",
    "msd": "Medical Segmentation Decathlon data (http://medicaldecathlon.com/) are licensed under CC BY-SA 4.0 "
           "(https://creativecommons.org/licenses/by-sa/4.0/); cite Antonelli et al. 2022.",
}
# what the configs, MONAI's bundle commands and the MONAI networks this code builds use besides its own imports
# (PyYAML: large_files.yml; einops: MONAI's SwinUNETR)
CONFIG_PACKAGES = ("tensorboard", "fire", "pytorch-ignite", "PyYAML", "einops")
# imported only for an optional input format (blosc2: nnU-Net v2's .b2nd cases), so not a bundle requirement
OPTIONAL_MODULES = {"blosc2"}
CODE_REFERENCE = re.compile(rf"(?<![\w.]){PACKAGE}\.(?=({'|'.join(SUBPACKAGES)})\b)")


# ------------------------------------------------------------------------------------------------- code
def package_folders() -> dict[str, Path]:
    """Where this package's code lives, as installed (wheel, editable checkout, or an exported bundle's scripts/)."""
    root = importlib.import_module(PACKAGE)
    folders = {"": Path(root.__file__).parent}
    for sub in SUBPACKAGES:
        folders[sub] = Path(importlib.import_module(f"{PACKAGE}.{sub}").__path__[0])
    return folders


def copy_code(scripts: Path) -> list[Path]:
    """This package's Python files into ``scripts/`` (the package's own ``__init__`` at its top)."""
    written = []
    for sub, folder in package_folders().items():
        files = [folder / "__init__.py"] if sub == "" else sorted(folder.rglob("*.py"))
        for source in files:
            target = scripts / sub / source.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            written.append(target)
    return written


def required_packages(files: list[Path]) -> dict[str, str]:
    """Distributions (name -> installed version) that the code and configs import, besides torch, monai, numpy."""
    modules = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"torch", "monai", "numpy", PACKAGE, "__future__"} | OPTIONAL_MODULES
    distributions = importlib.metadata.packages_distributions()
    names = {dist for module in modules for dist in distributions.get(module, [])} | set(CONFIG_PACKAGES)
    return {name: importlib.metadata.version(name) for name in sorted(names, key=str.lower)}


def environment_versions(code: list[Path], package: bool = False) -> dict:
    """metadata.json's version fields as installed here, for ``code`` (``package``: the configs also import this
    package, as the repository's bundles do, rather than their own ``scripts/``)."""
    packages = required_packages(code)
    if package:
        packages[PACKAGE] = importlib.metadata.version(PACKAGE)
    return {"monai_version": importlib.metadata.version("monai"), "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": importlib.metadata.version("numpy"), "required_packages_version": packages}


def package_code() -> list[Path]:
    return [f for sub, folder in package_folders().items() if sub for f in sorted(folder.rglob("*.py"))]


def metadata_drift(names: list[str]) -> list[str]:
    """Where the bundles' own metadata.json disagrees with what is installed, one line each."""
    installed, lines = environment_versions(package_code(), package=True), []
    for name in names:
        path = bundle_source(name) / "configs" / "metadata.json"
        meta = json.loads(path.read_text())
        for key, value in installed.items():
            if meta.get(key) != value:
                lines.append(f"{path}: {key} is {meta.get(key)}, installed: {value}")
    return lines


def sync_metadata(names: list[str]) -> list[Path]:
    """Write what is installed into the bundles' own metadata.json (the versions the bundles were tested with)."""
    installed, written = environment_versions(package_code(), package=True), []
    for name in names:
        path = bundle_source(name) / "configs" / "metadata.json"
        meta = json.loads(path.read_text())
        if any(meta.get(k) != v for k, v in installed.items()):
            meta.update(installed)
            with atomic_path(path) as tmp:
                Path(tmp).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
            written.append(path)
    return written


def bundle_names() -> list[str]:
    return sorted(p.name for p in bundle_source("").glob("medtuning_*"))


def retarget(text: str) -> str:
    """Config text whose code references name the bundle's ``scripts`` package instead of this package."""
    return CODE_REFERENCE.sub("scripts.", text).replace(f'"$import {PACKAGE}"', '"$import scripts"')


# ----------------------------------------------------------------------------------------------- models
def network_settings(models: Path) -> dict:
    settings = saved_network_settings(models)
    if settings is None:
        raise DataError(f"{models / NETWORK_FILE}: missing; the model in {models} was trained before models carried "
                        f"their network settings: train it again, or export with --models pointing at a newer run")
    return settings


def settings_overrides(settings: dict) -> dict:
    """Config values that build the network as it was trained."""
    return {"backbone": settings["backbone"], "method": settings["method"],
            "method_options": {settings["method"]: settings["method_options"]},
            "network_options": settings["options"], "in_channels": settings["in_channels"],
            "num_classes": settings["num_classes"], "patch_size": settings["patch_size"]}


def tuned_only(models: Path, settings: dict, target: Path) -> int:
    """The tuned part of ``models/model.pt`` as ``target`` (safetensors, with the settings in its metadata)."""
    from ..networks.checkpoint import save_tuned

    build = {k: v for k, v in settings.items() if k not in ("pretrained", "options")}
    network = build_bundle_network(**build, pretrained=None, options=settings["options"])
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(state.get("model", state))
    return save_tuned(network, target, extra={"network": settings})["tuned_file_bytes"]


def large_files_yaml(entries: list[dict]) -> str:
    lines = ["large_files:"]
    for e in entries:
        lines += [f'  - path: "{e["path"]}"', f'    url: "{e["url"]}"', f'    hash_val: "{e["hash_val"]}"',
                  '    hash_type: "sha256"']
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- docs
def zoo_readme(name: str, meta: dict, settings: dict | None, shipped: str, backbone: dict | None) -> str:
    """docs/README.md in the model zoo's sections."""
    if settings is None:
        overview = "**Untrained**: `models/` holds no weights. Train it with `configs/train.json` on your data."
        config = "The configs' defaults (the paper's setting)."
    else:
        overview = ("`models/model.pt` holds the whole network." if shipped == "full" else
                    "`models/model.safetensors` holds only what was tuned; the frozen pretrained backbone "
                    f"`models/{backbone['file']}` is named in `large_files.yml` (sha256 checked on load).")
        config = "\n".join(f"- {k}: `{json.dumps(v)}`" for k, v in settings_overrides(settings).items())
    metrics = "\n".join(f"- {k}: {v}" for k, v in meta.get("eval_metrics", {}).items()) or "- not measured"
    fetch = ("python -m monai.bundle download_large_files   # the pretrained backbone, hash-checked\n"
             if shipped == "tuned" else "")
    return f"""# Model Overview
{meta['description']}

Task: {meta['task']}. {overview}

## Data
{meta['data_source']}

Input: {meta['image_classes']}. Output: {meta['pred_classes']}.

## Training configuration
{config}

## Performance
{metrics}

## MONAI Bundle Commands
From inside this folder (`{name}/`):

```bash
{fetch}python -m monai.bundle run --config_file configs/inference.json --images "[['case_t1.nii.gz','case_t1ce.nii.gz','case_t2.nii.gz','case_flair.nii.gz']]"
python -m monai.bundle run --config_file configs/train.json --dataset_dir WORK   # WORK: python -m scripts.preprocessing prepare ...
python -m monai.bundle run --config_file "['configs/train.json','configs/demo.json']"   # synthetic demo data
```

Predictions go to `predictions/`, training writes `models/` and `eval/`, all below this folder
(`--output_dir`, `--ckpt_dir` change that).

# References
{chr(10).join('- ' + r for r in meta.get('references', []))}

# License
Code: Apache-2.0 (`LICENSE`). Data: `docs/data_license.txt`. {meta.get('intended_use', '')}.
"""


def written_labels(plan_file: Path) -> dict[str, str]:
    """The label values the bundle writes (the dataset's own: BraTS 0/1/2/4, an MSD task's) and their names, from
    the plan it was trained with: the output's ``channel_def``, from which MONAI Label lists the model's labels."""
    plan = json.loads(plan_file.read_text())
    names = sorted(plan["labels"].items(), key=lambda item: item[1])
    values = plan.get("original_label_values") or [value for _, value in names]
    return {str(int(values[index])): name for name, index in names}


# ------------------------------------------------------------------------------------------------ export
def export_bundle(name: str, out: str | Path, models: str | Path | None = None, full: bool = False,
                  backbone_url: str | None = None) -> Path:
    """Write ``OUT/NAME_vX.Y.Z.zip``; return its path."""
    source = bundle_source(name)
    if not (source / "configs" / "metadata.json").is_file():
        raise DataError(f"{source}: no such bundle in this package")
    models = Path(models) if models else Path(bundle_root(name)) / "models"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((source / "configs" / "metadata.json").read_text())
    train = json.loads((source / "configs" / "train.json").read_text())
    trained = (models / "model.pt").is_file()
    settings = network_settings(models) if trained else None
    backbone = settings and settings.get("pretrained")
    shipped = "none" if not trained else "full" if full or not backbone else "tuned"
    if trained and not full and not backbone:
        print(f"{models}: trained without a pretrained backbone file, so its frozen weights ship too (model.pt)",
              file=sys.stderr)

    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as staging:
        root = Path(staging) / name
        code = copy_code(root / "scripts")
        shutil.copytree(source / "configs", root / "configs")
        shutil.copyfile(source / "LICENSE", root / "LICENSE")
        (root / "models").mkdir()
        overrides = settings_overrides(settings) if settings else {}
        if shipped == "tuned":
            tuned_only(models, settings, root / "models" / TUNED_FILE)
            url = backbone_url or BACKBONE_RELEASES.get(backbone["file"])
            if not url:
                raise DataError(f"{backbone['file']}: no known release of this backbone file; give --backbone-url")
            (root / "large_files.yml").write_text(large_files_yaml(
                [{"path": f"models/{backbone['file']}", "url": url, "hash_val": backbone["sha256"]}]))
            overrides.update(pretrained=f"$@bundle_root + '/models/{backbone['file']}'",
                             pretrained_sha256=backbone["sha256"])
        elif shipped == "full":
            shutil.copyfile(models / "model.pt", root / "models" / "model.pt")
        for extra in ("plan.json", NETWORK_FILE):
            if trained and (models / extra).is_file():
                shutil.copyfile(models / extra, root / "models" / extra)

        for config in (root / "configs").glob("*.json"):
            text = retarget(config.read_text())
            if config.name in ("train.json", "inference.json") and overrides:
                content = json.loads(text)
                content.update(overrides)
                text = json.dumps(content, indent=1, ensure_ascii=False) + "\n"
            config.write_text(text)
        meta.update(environment_versions(code))
        if trained and (models / "plan.json").is_file():
            meta["network_data_format"]["outputs"]["pred"]["channel_def"] = written_labels(models / "plan.json")
        if settings:
            for port in ("inputs", "outputs"):
                for spec in meta["network_data_format"][port].values():
                    spec["spatial_shape"] = settings["patch_size"]
        else:
            meta["description"] += " Untrained: models/ holds no weights; train it with configs/train.json."
            meta.pop("eval_metrics", None)
        (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
        (root / "docs").mkdir()
        (root / "docs" / "README.md").write_text(zoo_readme(name, meta, settings, shipped, backbone))
        (root / "docs" / "data_license.txt").write_text(DATA_LICENSES[train["dataset_kind"]] + "\n")

        target = out / f"{name}_v{meta['version']}.zip"
        archive = shutil.make_archive(str(Path(staging) / name), "zip", root_dir=staging, base_dir=name)
        with atomic_path(target) as tmp:
            shutil.move(archive, tmp)
    return target


def paper_size_files(names: list[str]) -> list[dict]:
    """Each bundle's default (paper-size) network: bytes of the full model.pt and of the tuned-only file."""
    from monai.bundle import ConfigParser

    from ..networks.checkpoint import save_tuned

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            parser = ConfigParser()
            parser.read_config(str(bundle_source(name) / "configs" / "train.json"))
            parser["bundle_root"] = tmp
            network = parser.get_parsed_content("network_def")
            full = Path(tmp) / "model.pt"
            torch.save({"model": network.state_dict()}, full)
            tuned = save_tuned(network, Path(tmp) / TUNED_FILE)["tuned_file_bytes"]
            settings = network.bundle_settings
            rows.append({"bundle": name, "network": f"{settings['backbone']} + {settings['method']}",
                         "full_bytes": full.stat().st_size, "tuned_bytes": tuned})
            del network
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PACKAGE}.bundles.export", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", help="medtuning_brats, medtuning_kits or medtuning_msd")
    parser.add_argument("--out", default=".", help="folder for NAME_vX.Y.Z.zip")
    parser.add_argument("--models", help="the trained models/ folder to ship (default: the bundle's own)")
    parser.add_argument("--full", action="store_true", help="ship the whole network (model.pt), not only the tuned part")
    parser.add_argument("--backbone-url", help="where users get the pretrained backbone file (large_files.yml)")
    parser.add_argument("--sizes", action="store_true",
                        help="print a Markdown table of paper-size model files (full vs tuned-only) for every bundle")
    parser.add_argument("--sync-metadata", action="store_true",
                        help="write the installed versions into the bundles' own metadata.json (after a tested upgrade)")
    args = parser.parse_args(argv)
    if args.sync_metadata:
        for path in sync_metadata([args.bundle] if args.bundle else bundle_names()):
            print(f"updated {path}")
        return 0
    if args.sizes:
        names = [args.bundle] if args.bundle else bundle_names()
        print("| bundle | network | full model.pt | tuned-only model.safetensors | ratio |\n|---|---|---:|---:|---:|")
        for r in paper_size_files(names):
            print(f"| {r['bundle']} | {r['network']} | {r['full_bytes'] / 2**20:.1f} MiB | "
                  f"{r['tuned_bytes'] / 2**20:.1f} MiB | {r['tuned_bytes'] / r['full_bytes']:.2f} |")
        return 0
    if not args.bundle:
        parser.error("name a bundle (or --sizes)")
    try:
        print(export_bundle(args.bundle, args.out, args.models, args.full, args.backbone_url))
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
