"""Regenerate the samples shipped in ``data/`` from ``../shared/data`` (deterministic).

    python -m medgemma_lib.data.samples ../shared/data data

* ``medquad_sample.csv``: about 1,000 MedQuAD pairs, whole focus areas drawn per source with a
  fixed seed, every one of the nine answered sources present (small sources get at least 40 rows).
* ``zh_toyhom_sample_gb18030.csv``: 200 Toyhom pairs in the upstream layout (``department,title,
  ask,answer``) and the upstream encoding (GB18030), to practise column mapping and encodings.
"""

from __future__ import annotations

import csv
import random
import sys
from collections import defaultdict
from pathlib import Path

MEDQUAD_TARGET = 1000
MIN_PER_SOURCE = 40
SEED = 20261129


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def medquad_sample(rows: list[dict[str, str]], target: int = MEDQUAD_TARGET, seed: int = SEED) -> list[dict[str, str]]:
    """Whole focus areas per source until each source's quota is met; rows keep their file order."""
    by_source: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, row in enumerate(rows):
        by_source[row["source"]][row["focus_area"].casefold() or f"#{i}"].append(i)
    rng = random.Random(seed)
    chosen: list[int] = []
    for source in sorted(by_source):
        areas = by_source[source]
        size = sum(len(v) for v in areas.values())
        quota = max(MIN_PER_SOURCE, round(target * size / len(rows)))
        keys = sorted(areas)
        rng.shuffle(keys)
        taken = 0
        for key in keys:
            if taken >= quota:
                break
            if taken + len(areas[key]) > quota * 1.2 and taken > 0:
                continue  # a huge focus area would overshoot: try a smaller one
            chosen.extend(areas[key])
            taken += len(areas[key])
    return [rows[i] for i in sorted(chosen)]


def toyhom_upstream_rows(rows: list[dict[str, str]], n: int = 200, seed: int = SEED) -> list[dict[str, str]]:
    """``n`` Toyhom pairs in the upstream column layout."""
    picked = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [
        {
            "department": rows[i]["focus_area"],
            "title": rows[i]["title"],
            "ask": rows[i]["ask"],
            "answer": rows[i]["answer"],
        }
        for i in picked
    ]


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, str]], encoding: str) -> None:
    with open(path, "w", encoding=encoding, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def build_samples(shared_data: str | Path, out_dir: str | Path) -> dict[str, int]:
    shared, out = Path(shared_data), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = _read_csv(shared / "medquad" / "medquad.csv")
    sample = medquad_sample(rows)
    _write_csv(out / "medquad_sample.csv", columns, sample, "utf-8")
    _, toyhom = _read_csv(shared / "zh_medical_dialogue_toyhom" / "toyhom_im_sample2000.csv")
    zh = toyhom_upstream_rows(toyhom)
    _write_csv(out / "zh_toyhom_sample_gb18030.csv", ["department", "title", "ask", "answer"], zh, "gb18030")
    return {"medquad_sample.csv": len(sample), "zh_toyhom_sample_gb18030.csv": len(zh)}


if __name__ == "__main__":
    print(
        build_samples(
            sys.argv[1] if len(sys.argv) > 1 else "../shared/data", sys.argv[2] if len(sys.argv) > 2 else "data"
        )
    )
