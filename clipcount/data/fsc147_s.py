"""FSC-147-S-v2: the prompt-fidelity subset published with T2ICount (CVPR 2025).

230 FSC-147 images, each paired with a class that is NOT the image's annotated dominant class and
that class's count: {"7.jpg": {"class": "people", "count": 1}, ...}. Only counts are published, so
samples have no points (`points` is (0, 2)) and carry the count in `count_override`. A model that
ignores the prompt counts the dominant class and scores badly here.
"""

from __future__ import annotations

from pathlib import Path

from clipcount.data.fsc147 import IMAGE_DIR, read_json
from clipcount.data.sample import BadItem, CountingDataset, SampleRecord, collect_records, image_record, require_file
from clipcount.errors import DataError

SUBSET_FILE = "FSC-147-S-v2.json"


def find_subset_json(images_root: Path) -> Path:
    """The subset file next to the images: in the images folder, the FSC-147 root, or its parent."""
    for folder in (images_root, images_root.parent, images_root.parent.parent):
        if (folder / SUBSET_FILE).is_file():
            return folder / SUBSET_FILE
    raise DataError(
        f"no {SUBSET_FILE} found in {images_root} or its parents; pass subset_json= "
        "(the file is published with T2ICount, CVPR 2025)"
    )


class FSC147S(CountingDataset):
    """FSC-147-S-v2 samples: FSC-147 images, a non-dominant class prompt, and its count."""

    dataset_name = "FSC-147-S"

    def __init__(self, images_root: str | Path, subset_json: str | Path | None = None, skip_bad: bool = False):
        root = Path(images_root)
        # Accept the FSC-147 root as well as its image folder.
        if (root / IMAGE_DIR).is_dir():
            root = root / IMAGE_DIR
        if not root.is_dir():
            raise DataError(f"FSC-147-S image folder {root} not found; pass FSC-147's {IMAGE_DIR} folder")
        path = find_subset_json(root) if subset_json is None else Path(subset_json)
        hint = "pass subset_json= pointing at FSC-147-S-v2.json"
        subset = read_json(require_file(path, "FSC-147-S subset file", hint))
        if not isinstance(subset, dict):
            raise DataError(f"{path}: expected {{image: {{'class': ..., 'count': ...}}}}, got {type(subset).__name__}")
        self.images_root = root

        def make(name: str) -> SampleRecord:
            entry = subset[name]
            if not isinstance(entry, dict) or "class" not in entry or "count" not in entry:
                raise BadItem(f"{path} entry {name}: expected {{'class': ..., 'count': ...}}, got {entry!r}")
            count = entry["count"]
            if not isinstance(count, (int, float)) or count < 0 or int(count) != count:
                raise BadItem(f"{path} entry {name}: count must be a whole number >= 0, got {count!r}")
            return image_record(name, root / name, str(entry["class"]).strip(), [],
                                where=f"{path} entry {name}", count_override=int(count))

        records, skipped = collect_records(list(subset), make, self.dataset_name, skip_bad)
        super().__init__(records, skipped)

    @property
    def classes(self) -> list[str]:
        return self.prompts
