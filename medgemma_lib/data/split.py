"""Split rows into train / validation / test without leakage.

Rows that share a focus area (case-insensitive) or an identical question are joined into one
group (union-find), and whole groups go to one split, so the test set never asks about a disease
or repeats a question the model trained on. Groups are shuffled with the seed and assigned per
source (stratified), so every source appears in every split where it has enough groups.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict

from medgemma_lib.core.errors import DataError

SPLITS = ("train", "validation", "test")


def _key(text: str) -> str:
    return " ".join(text.casefold().split())


def leakage_groups(rows: list[dict[str, str]]) -> list[int]:
    """A group id per row; rows sharing a focus area or an identical question share a group."""
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen: dict[tuple[str, str], int] = {}
    for i, row in enumerate(rows):
        keys = [("q", _key(row["question"]))]
        if row.get("focus_area", "").strip():
            keys.append(("f", _key(row["focus_area"])))
        for key in keys:
            j = first_seen.setdefault(key, i)
            if j != i:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    return [find(i) for i in range(len(rows))]


def split_by_focus_area(
    rows: list[dict[str, str]], validation_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 42
) -> dict[str, list[int]]:
    """Row indices per split; deterministic for a seed; no group crosses splits."""
    if validation_fraction < 0 or test_fraction < 0 or validation_fraction + test_fraction >= 0.9:
        raise DataError(
            f"切分比例不合理：驗證 {validation_fraction}、測試 {test_fraction}。",
            hint="兩者都要 ≥ 0，且相加小於 0.9，例如 --val-fraction 0.1 --test-fraction 0.1。",
        )
    group_of = leakage_groups(rows)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group_of):
        members[g].append(i)
    # Stratify on the group's most common source (ties broken by name, so it is deterministic).
    by_source: dict[str, list[int]] = defaultdict(list)
    for g, idx in members.items():
        counts = Counter(rows[i].get("source", "") for i in idx)
        source = min(counts, key=lambda s: (-counts[s], s))
        by_source[source].append(g)
    rng = random.Random(seed)
    assigned: dict[str, list[int]] = {s: [] for s in SPLITS}
    for source in sorted(by_source):
        groups = sorted(by_source[source])  # group ids are the smallest row index: stable order
        rng.shuffle(groups)
        total = sum(len(members[g]) for g in groups)
        targets = {"test": test_fraction * total, "validation": validation_fraction * total}
        got = {"test": 0, "validation": 0}
        for g in groups:
            size = len(members[g])
            for name in ("test", "validation"):
                # Take the group if it fits (a small overshoot is fine; a giant group stays in train).
                if got[name] < targets[name] and got[name] + size <= targets[name] + max(1.0, 0.5 * size, 0.02 * total):
                    got[name] += size
                    assigned[name].extend(members[g])
                    break
            else:
                assigned["train"].extend(members[g])
    for name in SPLITS:
        rng_split = random.Random(f"{seed}-{name}")
        assigned[name].sort()
        rng_split.shuffle(assigned[name])
    _check_sizes(assigned, validation_fraction, test_fraction, len(set(group_of)))
    return assigned


def _check_sizes(assigned: dict[str, list[int]], val: float, test: float, groups: int) -> None:
    empty = [n for n, frac in (("validation", val), ("test", test)) if frac > 0 and not assigned[n]]
    if not assigned["train"] or empty:
        which = "、".join(
            ["訓練集"] * (not assigned["train"]) + [{"validation": "驗證集", "test": "測試集"}[n] for n in empty]
        )
        raise DataError(
            f"資料太少，無法切分：清理後只有 {groups} 個互不重疊的群組"
            f"（同一主題或同一問題必須在同一個集合），{which}會是空的。",
            hint="請提供更多資料（不同主題 focus_area），或把 --val-fraction / --test-fraction 設為 0。",
        )


def crossing_keys(rows: list[dict[str, str]], split_of_row: dict[int, str], field: str) -> set[str]:
    """Values of ``field`` (normalised) that appear in more than one split; empty means no leakage."""
    seen: dict[str, set[str]] = defaultdict(set)
    for i, name in split_of_row.items():
        value = rows[i].get(field, "")
        if value.strip():
            seen[_key(value)].add(name)
    return {k for k, names in seen.items() if len(names) > 1}


def split_sizes(splits) -> dict[str, int]:
    """How many records each split holds (lists of records or a ``DatasetDict``), in the splits' order."""
    return {name: len(records) for name, records in splits.items()}


def all_records(splits: dict[str, list[dict]]) -> list[dict]:
    """Every record of every split, split after split (what the token-length report measures)."""
    return [record for records in splits.values() for record in records]


def focus_areas_by_split(splits: dict[str, list[dict]]) -> dict[str, list[str]]:
    """The sorted distinct focus areas of each split: with no leakage, no value appears under two splits."""
    return {name: sorted({r.get("focus_area", "") for r in records}) for name, records in splits.items()}
