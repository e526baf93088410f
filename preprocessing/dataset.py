"""An nnU-Net v2 raw dataset on disk: dataset.json, imagesTr/CASE_000C, labelsTr/CASE, optional imagesTs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .io import DataError, read_json

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")


@dataclass
class CaseFiles:
    case_id: str
    images: list[Path]
    label: Path | None = None


@dataclass
class RawDataset:
    """The raw layout every converter writes and every later step reads."""

    root: Path
    meta: dict = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | Path) -> "RawDataset":
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: dataset folder not found")
        path = root / "dataset.json"
        meta = read_json(path, "missing; a raw dataset needs dataset.json (run `python -m medtuning.preprocessing convert`)")
        missing = [k for k in REQUIRED_KEYS if k not in meta]
        if missing:
            raise DataError(f"{path}: missing key(s) {', '.join(missing)}")
        return cls(root=root, meta=meta)

    def in_user_terms(self, text: str) -> str:
        """``text`` with every raw file it names also named by the user's file it was converted from."""
        for relative, source in (self.meta.get("source_files") or {}).items():
            raw = str(self.root / relative)
            if raw in text:
                text = text.replace(raw, f"{source} (converted to {raw})")
        return text

    @property
    def name(self) -> str:
        return self.meta.get("name", self.root.name)

    @property
    def file_ending(self) -> str:
        return self.meta["file_ending"]

    @property
    def channel_names(self) -> dict[str, str]:
        return self.meta["channel_names"]

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def labels(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.meta["labels"].items()}

    @property
    def original_label_values(self) -> list[int]:
        """Label value in the source dataset for each raw label (index = raw value); identity if not remapped."""
        values = self.meta.get("original_label_values")
        return [int(v) for v in values] if values else sorted(self.labels.values())

    def image_path(self, folder: str, case_id: str, channel: int) -> Path:
        return self.root / folder / f"{case_id}_{channel:04d}{self.file_ending}"

    def _cases(self, folder: str, with_labels: bool) -> list[CaseFiles]:
        directory = self.root / folder
        if not directory.is_dir():
            return []
        suffix = f"_0000{self.file_ending}"
        ids = sorted(p.name[: -len(suffix)] for p in directory.iterdir()
                     if p.name.endswith(suffix) and not p.name.startswith("."))
        cases = []
        for case_id in ids:
            images = [self.image_path(folder, case_id, c) for c in range(self.num_channels)]
            label = self.root / "labelsTr" / f"{case_id}{self.file_ending}" if with_labels else None
            cases.append(CaseFiles(case_id, images, label))
        return cases

    def training_cases(self) -> list[CaseFiles]:
        return self._cases("imagesTr", with_labels=True)

    def test_cases(self) -> list[CaseFiles]:
        return self._cases("imagesTs", with_labels=False)
