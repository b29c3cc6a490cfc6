"""Command-line interface: ``python -m medgemma_lib <command> ...`` (also installed as ``medgemma``).

Every sub-command is declared here, and only here (TRL's ``trl/cli`` shape). Each handler imports
the step module it runs *inside the handler*: ``--help`` and a mistyped option then cost no torch,
transformers or TRL import, and the step modules themselves import their dependencies at the top.
Those handler imports are the only function-local imports of the project's own modules
(``tests/test_architecture.py`` checks that).

User errors (:class:`~medgemma_lib.core.errors.MedgemmaError`) are printed in Traditional Chinese and
give exit code 2 with no traceback, unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

from medgemma_lib.core.errors import EXIT_USER_ERROR, ConfigError, MedgemmaError, ModelError, ResourceError

QUANTIZATIONS = ["nf4", "int8", "none"]


class ChineseArgumentParser(argparse.ArgumentParser):
    """argparse with Traditional Chinese usage errors (still exit code 2)."""

    def error(self, message: str) -> None:  # pragma: no cover - exercised through subprocess tests
        message = re.sub(r"^argument ", "選項 ", message)
        self.print_usage(sys.stderr)
        sys.stderr.write(f"參數錯誤：{message}\n請執行 `{self.prog} --help` 查看用法。\n")
        raise SystemExit(EXIT_USER_ERROR)


def number(kind: type, *, low: float | None = None, high: float | None = None, low_open: bool = False, example: str):
    """An argparse ``type=`` for a number in a range: a wrong type, sign or size is a Chinese usage error (exit 2)."""
    word = "整數" if kind is int else "數字"

    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} 不是{word}。請改成{word}，例如 {example}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} 不是有限的數字。請改成一般的數字，例如 {example}")
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            lower = f"大於 {low:g}" if low_open else f"至少 {low:g}" if low is not None else ""
            upper = f"最多 {high:g}" if high is not None else ""
            raise argparse.ArgumentTypeError(
                f"{text} 超出範圍：必須{'、'.join(x for x in (lower, upper) if x)}。請改成例如 {example}"
            )
        return value

    parse.__name__ = word  # argparse names the type in its own messages
    return parse


def _print_help_of(parser: argparse.ArgumentParser):
    """Handler of a command group given without its action: show the group's help, exit 2."""

    def handler(args) -> int:
        parser.print_help()
        return EXIT_USER_ERROR

    return handler


# ----------------------------------------------------------------------------------------------
# doctor · config · auth


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="檢查環境（Python、PyTorch、GPU、套件、磁碟）並建議適合的設定檔")
    p.add_argument("--json", action="store_true", help="以 JSON 輸出（給程式使用）")
    p.set_defaults(func=_run_doctor)


def _run_doctor(args) -> int:
    from dataclasses import asdict

    from medgemma_lib.setup import env  # handler import: see the module docstring

    report = env.collect_environment()
    rec = env.recommend(report)
    if args.json:
        print(json.dumps({"report": report.to_dict(), "recommendation": asdict(rec)}, ensure_ascii=False, indent=2))
    else:
        print(env.format_report(report, rec))
    return EXIT_USER_ERROR if env.refuses_training(report) else 0


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="檢查設定檔（YAML）是否正確，並印出套用覆寫後的完整設定")
    # check / show as sub-actions, each with one positional list: `config check --config X a.b=1` keeps the override
    # (with two positionals argparse gave `overrides` the empty run before --config and refused what came after)
    csub = p.add_subparsers(dest="config_action", metavar="動作", parser_class=type(p))
    for action, text in (("check", "只檢查"), ("show", "檢查並印出完整設定")):
        a = csub.add_parser(action, help=text)
        a.add_argument("--config", help="設定檔路徑，例如 configs/demo.yaml")
        a.add_argument("overrides", nargs="*", help="覆寫，例如 train.learning_rate=1e-4")
        a.set_defaults(func=_run_config, action=action)
    p.set_defaults(func=_print_help_of(p))


def _run_config(args) -> int:
    import yaml

    from medgemma_lib.core import config  # handler import: see the module docstring

    cfg = config.load_config(args.config, args.overrides)
    config.validate_run(cfg)  # exactly what `train` checks before it creates anything
    if args.action == "show":
        print(yaml.safe_dump(cfg.to_dict(), allow_unicode=True, sort_keys=False))
    print("設定檢查通過 ✓")
    return 0


def _add_auth(sub) -> None:
    p = sub.add_parser("auth", help="Hugging Face 權杖與 MedGemma 存取權檢查")
    asub = p.add_subparsers(dest="auth_command", metavar="動作")
    c = asub.add_parser("check", help="檢查權杖能否下載某個模型（可以：結束碼 0；不行：2）")
    c.add_argument(
        "--model", default="google/medgemma-4b-it", help="模型 id 或設定檔名稱（預設 google/medgemma-4b-it）"
    )
    c.add_argument(
        "--timeout",
        type=number(float, low=0, high=3600, low_open=True, example="--timeout 15"),
        default=None,
        help="等待 Hub 回應的秒數（預設 15）",
    )
    c.set_defaults(func=_run_auth_check)
    w = asub.add_parser("whoami", help="顯示權杖屬於哪個帳號（權杖只以遮蔽形式顯示）")
    w.set_defaults(func=_run_auth_whoami)
    p.set_defaults(func=_print_help_of(p))


def _run_auth_check(args) -> int:
    from medgemma_lib.setup import auth  # handler import: see the module docstring

    result = auth.check_access(args.model, timeout=auth.DEFAULT_TIMEOUT_S if args.timeout is None else args.timeout)
    print(result.format())
    return 0 if result.ok else EXIT_USER_ERROR


def _run_auth_whoami(args) -> int:
    from medgemma_lib.setup import auth  # handler import: see the module docstring

    info = auth.whoami()
    print(f"帳號：{info['name']}")
    print(
        f"權杖：{info['masked_token']}（來源：{auth.SOURCE_NAMES[info['token_source']]}；"
        f"權限：{info['role'] or '未知'}）"
    )
    return 0


# ----------------------------------------------------------------------------------------------
# data


# CLI option -> DataSection field (None means "not given": the YAML or default value stays).
_DATA_OVERRIDES = {
    "input": "input",
    "encoding": "encoding",
    "system_prompt": "system_prompt",
    "convert": "chinese_conversion",
    "max_answer_chars": "max_answer_chars",
    "long_answers": "long_answer_policy",
    "val_fraction": "validation_fraction",
    "test_fraction": "test_fraction",
    "seed": "seed",
    "deidentify": "deidentify",
    "max_train_examples": "max_train_examples",
    "max_eval_examples": "max_eval_examples",
}


def _add_data(sub) -> None:
    parser = sub.add_parser(
        "data", help="資料準備：讀取、清理、切分、格式化問答資料", description="資料準備（notebook 03 的同一套函式）。"
    )
    dsub = parser.add_subparsers(dest="data_command", metavar="子指令", parser_class=type(parser))
    p = dsub.add_parser(
        "prepare",
        help="把問答檔準備成訓練用的 train/validation/test",
        description="讀取 CSV、JSONL 或 MedQuAD XML，清理、去識別化、切分（不洩漏主題）、格式化成 TRL 對話格式並存檔。",
    )
    p.add_argument("--input", help="輸入檔：CSV、JSONL、MedQuAD XML 資料夾或 .tar.gz（預設：設定檔的 data.input）")
    p.add_argument("--output", help="輸出資料夾（splits/ 與 prepare_report.json）；不給則只顯示報告")
    p.add_argument("--columns", help="欄位對應，例如 question=ask,answer=answer,focus_area=department")
    p.add_argument("--encoding", help="檔案編碼（utf-8、utf-8-sig、cp950、gb18030、utf-16…）；不給則自動偵測")
    p.add_argument("--format", choices=["csv", "jsonl", "xml"], help="輸入格式；不給則依副檔名判斷")
    p.add_argument(
        "--convert",
        choices=["s2t", "s2tw", "s2twp", "t2s", "tw2s"],
        help="OpenCC 繁簡轉換，例如 s2twp（簡體轉台灣正體）",
    )
    p.add_argument("--system-prompt", help="可選的系統指示")
    p.add_argument(
        "--max-answer-chars", type=number(int, low=1, example="--max-answer-chars 8000"), help="答案長度上限（字元）"
    )
    p.add_argument(
        "--long-answers", choices=["truncate", "drop"], help="超長答案：truncate（句子邊界截斷）或 drop（捨棄）"
    )
    p.add_argument(
        "--val-fraction",
        type=number(float, low=0, high=0.9, example="--val-fraction 0.1"),
        help="驗證集比例（預設 0.1）",
    )
    p.add_argument(
        "--test-fraction",
        type=number(float, low=0, high=0.9, example="--test-fraction 0.1"),
        help="測試集比例（預設 0.1）",
    )
    p.add_argument(
        "--seed", type=number(int, low=0, high=2**32 - 1, example="--seed 42"), help="切分用的亂數種子（預設 42）"
    )
    p.add_argument(
        "--deidentify", choices=["report", "mask", "refuse"], help="個資處理：report、mask 或 refuse（預設 report）"
    )
    p.add_argument(
        "--max-train-examples", type=number(int, low=1, example="--max-train-examples 400"), help="最多保留幾筆訓練資料"
    )
    p.add_argument(
        "--max-eval-examples",
        type=number(int, low=1, example="--max-eval-examples 50"),
        help="驗證集最多保留幾筆（測試集不受影響，評估時另有上限）",
    )
    p.add_argument("--config", help="YAML 設定檔（讀取其中的 data: 區段；命令列參數優先）")
    p.add_argument(
        "--tokenizer",
        default="auto",
        help="計算 token 長度用的 tokenizer：demo、模型資料夾、none；預設 auto（示範模型已在快取時才計算）",
    )
    p.add_argument("--overwrite", action="store_true", help="輸出資料夾已有先前的結果時取代它")
    p.add_argument("--json", action="store_true", help="以 JSON 印出完整報告")
    p.set_defaults(func=_run_data_prepare)
    s = dsub.add_parser(
        "stats", help="顯示已準備資料夾的報告", description="讀取 data prepare 的輸出資料夾並顯示報告。"
    )
    s.add_argument("folder", help="data prepare 的輸出資料夾")
    s.add_argument("--json", action="store_true", help="以 JSON 印出完整報告")
    s.set_defaults(func=_run_data_stats)
    parser.set_defaults(func=_print_help_of(parser))


def build_data_section(args: argparse.Namespace):
    """The DataSection from ``--config`` (or defaults) with command-line options on top."""
    from medgemma_lib.core import config  # handler import: see the module docstring

    cfg = config.load_config(args.config) if args.config else config.load_config(None)
    data = {f: getattr(cfg.data, f) for f in cfg.data.__dataclass_fields__}
    for option, field in _DATA_OVERRIDES.items():
        value = getattr(args, option, None)
        if value is not None:
            data[field] = value
    if args.columns is not None:
        from medgemma_lib.data import clean  # handler import: see the module docstring

        data["columns"] = clean.parse_column_mapping(args.columns)
    if data.get("input") is None:
        raise ConfigError("沒有指定輸入檔。", hint="請加上 --input 檔案路徑。")
    # Re-validate through the config layer, so CLI values get the same checks and Chinese messages as YAML.
    return config.config_from_dict({"data": data}).data


def _data_tokenizer(choice: str):
    """(a loader of the tokenizer that measures token lengths, or None; a dict that gets the note to print).

    The loader is called by the data step once the input was read and checked: a bad input is refused before
    transformers and the tokenizer load."""
    if choice == "none":
        return None, {"note": "略過 token 長度（--tokenizer none）"}
    state: dict = {"note": None}

    def load():
        from medgemma_lib.models import loading as models  # handler import: see the module docstring

        name = choice
        if name == "auto":
            if not models.demo_model_cached():
                state["note"] = (
                    "略過 token 長度：示範模型尚未下載轉換"
                    "（執行 python -m medgemma_lib models --prepare-demo 後再試，或加 --tokenizer demo）"
                )
                return None
            name = "demo"
        return models.load_tokenizer(name)

    return load, state


def _run_data_prepare(args) -> int:
    from medgemma_lib.core import paths  # handler import: see the module docstring

    started = time.perf_counter()
    data_cfg = build_data_section(args)
    paths.require_input(paths.resolve_path(data_cfg.input))  # a mistyped path is answered before the data imports
    from medgemma_lib import data  # handler import: see the module docstring

    if args.output:
        data.check_output_dir(args.output, args.overwrite)  # before loading anything heavy
    loader, state = _data_tokenizer(args.tokenizer)
    _, report = data.prepare_from_config(
        data_cfg, args.output, tokenizer_loader=loader, overwrite=args.overwrite, input_format=args.format
    )
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        print(data.format_report(report))
        if state["note"]:
            print(state["note"])
        if not args.output:
            print("（沒有 --output：只顯示報告，沒有存檔）")
        print(f"完成，用時 {time.perf_counter() - started:.1f} 秒。")
    sys.stdout.flush()
    return 0


def _run_data_stats(args) -> int:
    from medgemma_lib import data  # handler import: see the module docstring

    splits = data.load_prepared(args.folder)
    report = data.load_report(args.folder)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return 0
    print(data.format_report(report))
    print("目前資料夾中的筆數：" + "、".join(f"{name} {len(ds):,}" for name, ds in splits.items()))
    return 0


# ----------------------------------------------------------------------------------------------
# models · memory


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="列出模型設定檔，或預先轉換示範模型（離線教室準備用）")
    p.add_argument("--prepare-demo", action="store_true", help="把示範模型轉換並存入快取（只需一次）")
    p.set_defaults(func=_run_models)


def _run_models(args) -> int:
    from medgemma_lib.core.paths import display_path
    from medgemma_lib.core.profiles import PROFILES
    from medgemma_lib.models import loading as models  # handler import: see the module docstring

    if args.prepare_demo:
        started = time.time()
        path = models.ensure_demo_model(verbose=True)
        print(f"示範模型快取：{display_path(path)}（{time.time() - started:.1f} 秒）")
        return 0
    print(f"{'設定檔':<22}{'Hub id':<30}{'模型類別':<34}說明")
    for p in PROFILES.values():
        print(f"{p.name:<24}{(p.hub_id or '（離線套件）'):<32}{p.model_class:<36}{p.description}")
        print(
            f"{'':<24}預設：{'、'.join(p.presets) or '（無；請自行寫設定檔）'}" + ("　★ 建議" if p.recommended else "")
        )
    print(
        f"\n示範模型是否已快取：{'是' if models.demo_model_cached() else '否'}"
        f"（{display_path(models.demo_model_dir())}）"
    )
    return 0


def _add_memory(sub) -> None:
    p = sub.add_parser("memory", help="估算 QLoRA 訓練需要多少 GPU 記憶體，並依顯示卡大小給建議")
    p.add_argument(
        "--profile",
        default="medgemma-27b-text-it",
        help="模型設定檔：medgemma-1.5-4b-it、medgemma-4b-it、medgemma-27b-text-it、medgemma-27b-it、demo",
    )
    p.add_argument(
        "--gpu-gib",
        type=number(float, low=0, high=4096, low_open=True, example="--gpu-gib 24"),
        default=None,
        help="GPU 記憶體大小（GiB），例如 24",
    )
    p.add_argument("--quantization", default="nf4", choices=QUANTIZATIONS)
    p.add_argument("--lora-r", type=number(int, low=1, high=1024, example="--lora-r 16"), default=16)
    p.add_argument("--lora-targets", default="all-linear", help="all-linear 或以逗號分隔的層名，例如 q_proj,v_proj")
    p.add_argument(
        "--batch",
        type=number(int, low=1, high=4096, example="--batch 4"),
        default=4,
        help="每步的樣本數（micro-batch）",
    )
    p.add_argument(
        "--seq",
        type=number(int, low=8, high=131072, example="--seq 512"),
        default=512,
        help="序列長度（packing 時為每列長度）",
    )
    p.add_argument("--no-grad-ckpt", action="store_true", help="不使用梯度檢查點")
    p.add_argument("--liger", action="store_true", help="使用 Liger 核心")
    p.add_argument("--packing", action="store_true", help="把樣本接成長列（packing）")
    p.add_argument(
        "--lora-dropout",
        type=number(float, low=0, high=0.9, example="--lora-dropout 0.05"),
        default=0.05,
        help="LoRA dropout（0 可省下每層一份輸入副本與遮罩）",
    )
    p.add_argument(
        "--attn", default="sdpa", choices=["sdpa", "varlen", "flash_attention_2", "eager"], help="注意力實作"
    )
    p.add_argument(
        "--optim", default="adamw", help="最佳化器：adamw、adamw_fused、adamw_8bit（也接受 adamw_torch_fused 等名稱）"
    )
    p.add_argument(
        "--expandable-segments",
        action="store_true",
        help="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True（保留記憶體接近實際用量）",
    )
    p.add_argument("--table", action="store_true", help="列出 8～141 GB 顯示卡的建議表")
    p.add_argument("--json", action="store_true", help="以 JSON 輸出")
    p.set_defaults(func=_run_memory)


def _run_memory(args) -> int:
    from medgemma_lib.setup import memory  # handler import: see the module docstring

    if args.batch < 1 or args.seq < 8 or args.lora_r < 1:
        raise ConfigError("--batch、--seq、--lora-r 必須是正整數（--seq 至少 8）。")
    if not 0 <= args.lora_dropout < 1:
        raise ConfigError(f"--lora-dropout 必須介於 0 與 1 之間（目前 {args.lora_dropout}）。")
    targets = (
        "all-linear"
        if args.lora_targets == "all-linear"
        else tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    )
    memory.architecture(args.profile)
    if args.table:
        import pandas as pd

        with pd.option_context("display.max_colwidth", None, "display.width", 200):
            print(memory.advice_table(args.profile).to_string())
        return 0
    est = memory.estimate_training_memory(
        memory.TrainingSetup(
            profile=args.profile,
            quantization=args.quantization,
            lora_r=args.lora_r,
            lora_targets=targets,
            micro_batch=args.batch,
            seq_len=args.seq,
            gradient_checkpointing=not args.no_grad_ckpt,
            liger=args.liger,
            packing=args.packing,
            lora_dropout=args.lora_dropout,
            attn_implementation=args.attn,
            optim=args.optim,
            expandable_segments=args.expandable_segments,
        )
    )
    if args.json:
        print(json.dumps(est.to_dict(), ensure_ascii=False, indent=2))
    else:
        print(memory.format_estimate(est, args.gpu_gib))
    return 0


# ----------------------------------------------------------------------------------------------
# train · demo · evaluate · chat · export


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="LoRA／QLoRA 訓練（設定檔＋覆寫），結果寫到 results/<執行名稱>/")
    p.add_argument("--config", "-c", default="configs/demo.yaml", help="設定檔（YAML），預設 configs/demo.yaml")
    p.add_argument("--resume", action="store_true", help="從 results/<run_name>/checkpoints 中最新的完整檢查點接續")
    p.add_argument("--run-name", help="執行名稱（等同 train.run_name=...）")
    p.add_argument("overrides", nargs="*", metavar="區段.鍵=值", help="覆寫設定，例如 train.max_steps=20 lora.r=8")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from medgemma_lib.core import config  # handler import: see the module docstring

    overrides = list(args.overrides)
    if args.run_name:
        overrides.append(f"train.run_name={args.run_name}")
    cfg = config.load_config(args.config, overrides)
    # The checks run_training starts with, before torch, transformers and TRL are imported (10 s on a laptop):
    # a mistyped path or value is answered at once.
    source = config.validate_run(cfg)  # the model resolved once: training loads this, not the name again
    from medgemma_lib.training import train  # handler import: see the module docstring

    result = train.run_training(cfg, resume=args.resume, model_source=source)
    if (
        result.initial_eval_loss is not None
        and result.final_eval_loss is not None
        and result.final_eval_loss >= result.initial_eval_loss
    ):
        print("注意：驗證集 loss 沒有下降。可以提高學習率、增加步數，或檢查資料。", flush=True)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="一個指令跑完整個流程：示範模型（CPU、離線）準備資料、QLoRA 訓練、評估")
    p.add_argument("--no-eval", action="store_true", help="略過測試集評估（只訓練）")
    p.add_argument("overrides", nargs="*", metavar="區段.鍵=值", help="覆寫 configs/demo.yaml，例如 train.max_steps=40")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from medgemma_lib import demo  # handler import: see the module docstring

    summary = demo.run_demo(list(args.overrides), evaluate=not args.no_eval)
    v = summary["validation_loss"]
    return 0 if v["after"] < v["before"] else 1


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="評估一次訓練：基礎模型 vs 微調後（測試集 loss、ROUGE-L、BLEU、chrF、中文題）")
    p.add_argument("--run", required=True, help="執行資料夾，例如 results/demo-20261129-101500")
    p.add_argument(
        "--max-loss-examples",
        type=number(int, low=1, example="--max-loss-examples 100"),
        default=None,
        help="計算 loss 的測試資料筆數上限（預設：設定檔 eval.max_eval_examples，未設定則全部）",
    )
    p.add_argument(
        "--num-generate",
        type=number(int, low=0, high=10**6, example="--num-generate 16"),
        default=None,
        help="產生答案並計分的英文測試題數（預設：eval.num_generate）",
    )
    p.add_argument(
        "--max-new-tokens",
        type=number(int, low=1, high=8192, example="--max-new-tokens 128"),
        default=None,
        help="每題最多產生幾個 token（預設：eval.max_new_tokens）",
    )
    p.add_argument(
        "--batch-size",
        type=number(int, low=1, high=4096, example="--batch-size 8"),
        default=None,
        help="產生答案的批次大小（預設：eval.batch_size）",
    )
    p.add_argument(
        "--chinese-samples",
        type=number(int, low=0, high=10**6, example="--chinese-samples 4"),
        default=4,
        help="從隨附中文樣本取幾題（另有原始指南的三題）；0 表示只用三題",
    )
    p.add_argument("--no-chinese", action="store_true", help="略過中文題")
    p.add_argument(
        "--num-generate-chinese",
        type=number(int, low=0, high=10**6, example="--num-generate-chinese 10"),
        default=None,
        help="從 data.mix 保留的中文測試題取幾題（預設：eval.num_generate_chinese；0 表示用原始指南的題目）",
    )
    p.add_argument(
        "--bootstrap",
        type=number(int, low=0, high=10**6, example="--bootstrap 1000"),
        default=None,
        help="配對 bootstrap 重抽次數，算差異的 95%% 信賴區間（預設：設定檔）",
    )
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=None, help="基礎模型的量化方式（預設：與訓練相同）")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from medgemma_lib import MEDICAL_DISCLAIMER  # handler import: see the module docstring
    from medgemma_lib.core.display import markdown_table
    from medgemma_lib.evaluation import evaluate, report

    result = evaluate.run_evaluation(
        args.run,
        max_loss_examples=args.max_loss_examples,
        num_generate=args.num_generate,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        num_chinese_samples=args.chinese_samples,
        chinese=not args.no_chinese,
        num_generate_chinese=args.num_generate_chinese,
        bootstrap_resamples=args.bootstrap,
        quantization=args.quantization,
    )
    print()
    print(markdown_table(report.comparison_rows(result)).data)
    if result["chinese"]["answers"]:
        print("中文題：")
        print(markdown_table(report.comparison_rows(result, "chinese")).data)
    print(MEDICAL_DISCLAIMER)
    return 0


def _add_quality(sub) -> None:
    p = sub.add_parser(
        "quality",
        help="參考品質報告：完整訓練＋評估（含 95%% 信賴區間、語言一致率），寫到 docs/quality/<名稱>.json 與 .md",
    )
    p.add_argument("--config", "-c", required=True, help="設定檔，例如 configs/medquad-full.yaml")
    p.add_argument("--report", required=True, help="報告路徑（不含副檔名），例如 docs/quality/medquad-full-gemma3-270m")
    p.add_argument("--compare", action="append", default=[], help="另一份報告（.json），放進比較表；可重複")
    p.add_argument("overrides", nargs="*", metavar="區段.鍵=值", help="覆寫設定，例如 eval.num_generate=50")
    p.set_defaults(func=_run_quality)


def _run_quality(args) -> int:
    from medgemma_lib import MEDICAL_DISCLAIMER  # handler import: see the module docstring
    from medgemma_lib.evaluation import quality

    quality.run_quality(args.config, list(args.overrides), args.report, args.compare)
    print(MEDICAL_DISCLAIMER)
    return 0


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="與微調後的模型對話（逐行讀取問題，串流顯示答案與醫療免責聲明）")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="訓練結果資料夾（基礎模型＋LoRA 轉接器），例如 results/demo-run")
    src.add_argument("--model", help="export 匯出的獨立模型資料夾")
    p.add_argument("--base", action="store_true", help="關閉 LoRA 轉接器，用基礎模型回答（比較用）")
    p.add_argument("--greedy", action="store_true", help="貪婪解碼（每次答案相同，與評估一致）；預設為取樣")
    p.add_argument(
        "--temperature",
        type=number(float, low=0, high=5, low_open=True, example="--temperature 0.7"),
        default=0.7,
        help="取樣溫度（預設 0.7）",
    )
    p.add_argument(
        "--top-p",
        type=number(float, low=0, high=1, low_open=True, example="--top-p 0.95"),
        default=0.95,
        help="top-p 取樣（預設 0.95）",
    )
    p.add_argument(
        "--max-new-tokens",
        type=number(int, low=1, high=8192, example="--max-new-tokens 256"),
        default=256,
        help="每個答案最多幾個 token（預設 256）",
    )
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="基礎模型量化方式（預設：--run 與訓練相同；--model 不量化）",
    )
    p.add_argument(
        "--thinking",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="加上思考系統指示 SYSTEM INSTRUCTION: think silently if needed.（預設：--run 依 config.yaml 的 "
        "eval.thinking，--model 不加）；思考過程不會混進答案，只在答案後以一行摺疊提示",
    )
    p.set_defaults(func=_run_chat)


def _run_chat(args) -> int:
    if args.max_new_tokens < 1:
        raise ConfigError(
            f"--max-new-tokens 必須是正整數（收到 {args.max_new_tokens}）。", hint="例如 --max-new-tokens 256"
        )
    if not 0 < args.temperature <= 5:
        raise ConfigError(
            f"--temperature 必須在 0 到 5 之間（收到 {args.temperature}）。",
            hint="常用 0.7；要固定答案請改用 --greedy。",
        )
    if args.base and args.model:
        raise ConfigError(
            "--base 只能和 --run 一起用（匯出的模型已經合併了轉接器）。", hint="改用 --run 訓練結果資料夾。"
        )
    from medgemma_lib.evaluation import chat  # handler import: see the module docstring
    from medgemma_lib.training import runs

    run = runs.open_run(args.run) if args.run else None  # opened once: thinking and the model both read it
    thinking = args.thinking
    if thinking is None:
        thinking = bool(run.config.eval.thinking) if run is not None else False
    model, tokenizer = chat.load_chat_model(run, args.model, quantization=args.quantization, verbose=sys.stdin.isatty())
    n = chat.chat_loop(
        model,
        tokenizer,
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy,
        temperature=args.temperature,
        top_p=args.top_p,
        use_adapter=not args.base,
        thinking=thinking,
    )
    print(f"\n共回答 {n} 個問題。")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="把 LoRA 轉接器合併進基礎模型，匯出可直接以 transformers 載入的資料夾（可選上傳 Hub）"
    )
    p.add_argument("--run", required=True, help="訓練結果資料夾，例如 results/demo-run")
    p.add_argument("--output", default=None, help="輸出資料夾（預設：<run>/merged）")
    p.add_argument("--dtype", default="bfloat16", help="權重精度：bfloat16（預設）或 float32")
    p.add_argument("--overwrite", action="store_true", help="輸出資料夾已存在時覆蓋")
    p.add_argument("--verify", action="store_true", help="匯出後比對匯出模型與「基礎模型＋轉接器」的貪婪答案")
    p.add_argument("--push-to-hub", metavar="使用者/名稱", default=None, help="匯出後上傳到 Hugging Face Hub 的儲存庫")
    p.add_argument("--public", action="store_true", help="上傳為公開儲存庫（預設為私人）")
    p.add_argument(
        "--merge",
        choices=["auto", "stream", "memory"],
        default="auto",
        help="合併方式：auto（預設：記憶體放不下整個模型時逐檔合併）、stream（逐檔）、memory（整個模型載入）",
    )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="cpu", help="在哪裡計算合併：cpu（預設）、cuda、auto"
    )
    p.add_argument(
        "--format",
        default="safetensors",
        help="匯出格式：safetensors（預設，transformers 資料夾）或 gguf（單一檔案，給 llama.cpp、Ollama、LM Studio）",
    )
    p.add_argument(
        "--quant", default=None, help="GGUF 的權重格式：f16、bf16、q8_0（預設）或 q4_0（只用於 --format gguf）"
    )
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    if args.format not in ("safetensors", "gguf"):
        raise ConfigError(f"不支援的匯出格式 {args.format!r}。", hint="請用 safetensors（預設）或 gguf。")
    if args.format == "gguf":
        return _run_export_gguf(args)
    if args.quant is not None:
        raise ConfigError("--quant 只用於 GGUF 匯出。", hint="請加上 --format gguf，或拿掉 --quant。")
    from medgemma_lib.export import merge as export  # handler import: see the module docstring
    from medgemma_lib.training import runs

    if args.push_to_hub is not None:
        export.check_repo_id(args.push_to_hub)  # fail before the minutes of merging
    run = runs.open_run(args.run)  # opened once: merging and --verify use this one
    out = export.merge_adapter(
        run, args.output, dtype=args.dtype, overwrite=args.overwrite, device=args.device, method=args.merge
    )
    if args.verify:
        result = export.verify_export(out, run)
        if not export.verify_passed(result):
            raise ModelError(
                "匯出的模型與「基礎模型＋轉接器」差異過大，合併可能沒有生效。",
                hint="請回報此問題並附上 transformers 與 peft 版本。",
            )
        if not result["same"]:
            print(
                "注意：bf16 只有 8 位元有效數字，W + ΔW 存成 bf16 時，比 W 小很多的更新量會被捨入，"
                "貪婪答案可能在某個 token 開始分歧；需要逐位元一致時請用 --dtype float32。"
            )
    if args.push_to_hub is not None:
        url = export.push_to_hub(out, args.push_to_hub, private=not args.public)
        print(f"已上傳：{url}")
    return 0


def _run_export_gguf(args) -> int:
    from medgemma_lib.export import gguf  # handler import: see the module docstring
    from medgemma_lib.training import runs

    quant = gguf.check_quant(args.quant or "q8_0")  # refused before the run is opened or anything written
    if args.push_to_hub is not None or args.dtype != "bfloat16":
        raise ConfigError("--push-to-hub 與 --dtype 只用於 safetensors 匯出。", hint="GGUF 請用 --quant 選擇權重格式。")
    run = runs.open_run(args.run)
    out = gguf.export_gguf(run, quant, args.output, overwrite=args.overwrite)
    if args.verify:
        result = gguf.verify_gguf(out, run)
        print(
            f"GGUF 與「基礎模型＋轉接器」：貪婪答案{'相同 ✓' if result['same'] else '不完全相同'}，"
            f"下一個 token 的 logits 最大差距 {result['max_abs_logit_diff']:.3f}"
        )
    print(f"Ollama：cd {out} && ollama create medgemma-zh -f {gguf.MODELFILE} && ollama run medgemma-zh")
    return 0


# ----------------------------------------------------------------------------------------------
# bench · gradcheck (measurements)


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="以隨機權重的真實架構量測 QLoRA 訓練速度與 GPU 記憶體（輸出 JSON 與 Markdown 表格）"
    )
    p.add_argument("--arch", default="27b,4b", help="架構，逗號分隔：27b、4b、tiny（或設定檔名稱），預設 27b,4b")
    p.add_argument("--variants", default=None, help="只跑這些變體（逗號分隔的名稱）；預設全部")
    p.add_argument("--device", default=None, help="cuda 或 cpu；預設有 GPU 就用 GPU")
    p.add_argument(
        "--lengths", default=None, help="長度來源：MedQuAD CSV 或長度 JSON；預設用套件內附的完整 MedQuAD 長度"
    )
    p.add_argument(
        "--steps",
        type=number(int, low=1, high=100000, example="--steps 10"),
        default=None,
        help="覆寫每個變體的量測步數",
    )
    p.add_argument(
        "--warmup",
        type=number(int, low=0, high=100000, example="--warmup 2"),
        default=None,
        help="覆寫每個變體的暖身步數（不計入）",
    )
    p.add_argument("--out", default="results/bench", help="輸出資料夾（bench.json、bench.md）")
    p.add_argument("--seed", type=number(int, low=0, high=2**32 - 1, example="--seed 0"), default=0, help="亂數種子")
    p.add_argument("--check-packing", action="store_true", help="先檢查：打包後每筆的 logits 與單獨執行相同")
    p.add_argument(
        "--unsloth",
        default=None,
        metavar="TOKENIZER_XZ",
        help="改為量測 Unsloth（需另行安裝）；參數為 xz 壓縮的 Gemma 3 tokenizer.json（Unsloth 從資料夾載入模型）",
    )
    p.set_defaults(func=_run_bench)


def _check_unsloth_inputs(tokenizer_xz: str) -> None:
    """Refuse `bench --unsloth` before anything is built: the tokenizer file and the optional package."""
    import importlib.util

    from medgemma_lib.core.errors import DataError, ResourceError

    if not os.path.isfile(tokenizer_xz):
        raise DataError(
            f"--unsloth 指定的 tokenizer 檔案不存在：{tokenizer_xz}。"
            "請給 xz 壓縮的 Gemma 3 tokenizer.json 的路徑（例如 --unsloth tok.json.xz）。"
        )
    if importlib.util.find_spec("unsloth") is None:
        raise ResourceError(
            "找不到 Unsloth 套件：bench --unsloth 只用來在 GPU 上量測 Unsloth 作為對照。"
            "請在另一個虛擬環境安裝 unsloth 後再執行（做法見 docs/benchmarks.md）。"
        )


def _run_bench(args) -> int:
    # Reserved memory close to allocated: expandable segments instead of fixed-size blocks (before torch loads).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.unsloth:
        _check_unsloth_inputs(args.unsloth)
        import unsloth  # noqa: F401 - optional (GPU only); Unsloth must be imported before transformers to patch it
    from medgemma_lib.checks import bench  # handler import: see the module docstring
    from medgemma_lib.core.profiles import BENCH_ALIASES
    from medgemma_lib.models import loading as models

    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None

    def log(s):
        print(s, flush=True)

    if args.unsloth:
        from medgemma_lib.checks import unsloth as unsloth_peer  # handler import: see the module docstring

        for arch in archs:
            unsloth_peer.run_unsloth(
                BENCH_ALIASES.get(arch, arch), variants, args.unsloth, args.out, seed=args.seed, log=log
            )
        return 0
    if args.check_packing:
        device = args.device or models.default_device()
        for attn in ("sdpa", "varlen"):
            diff = bench.packed_matches_unpacked("tiny", device, attn=attn)
            control = bench.packed_matches_unpacked("tiny", device, attn=attn, restart_positions=False)
            print(
                f"打包檢查（{attn}，{device}）：最大 logits 相對差 {diff:.2e}"
                f"（對照組：位置不重新起算時 {control:.2e}）",
                flush=True,
            )
            if diff > (2e-2 if device.startswith("cuda") else 1e-4):
                raise ResourceError(
                    f"打包後的結果與單獨執行不同（{attn}，差 {diff:.2e}）：樣本之間互相看到了。",
                    hint="請回報此問題，並附上 torch 與 transformers 版本。",
                )
    bench.run_bench(
        archs,
        device=args.device,
        variants=variants,
        lengths=args.lengths,
        out_dir=args.out,
        seed=args.seed,
        steps=args.steps,
        warmup=args.warmup,
        log=log,
    )
    print(f"結果已寫入 {args.out}/bench.json 與 bench.md")
    return 0


def _add_trainbench(sub) -> None:
    p = sub.add_parser(
        "trainbench",
        help="經由產品本身的 run_training 量測各 GPU 預設的速度與記憶體（隨機權重的真實架構；JSON 與 Markdown 表格）",
    )
    p.add_argument("--arch", default="4b", help="架構，逗號分隔：4b、27b、tiny；預設 4b")
    p.add_argument("--only", default=None, help="只跑這些列（逗號分隔的列名，見 medgemma_lib.checks.trainbench.ROWS）")
    p.add_argument("--out", default="results/trainbench", help="輸出資料夾（trainbench.json、trainbench.md）")
    p.add_argument("--steps", type=number(int, low=1, high=10000, example="--steps 8"), default=8, help="計時的步數")
    p.add_argument(
        "--warmup",
        type=number(int, low=1, high=1000, example="--warmup 3"),
        default=3,
        help="不計時的暖身步數（含編譯時間）",
    )
    p.add_argument(
        "--budget-s",
        type=number(float, low=0, low_open=True, high=1e6, example="--budget-s 480"),
        default=None,
        help="超過這麼多秒就不再開始新的一列",
    )
    p.add_argument(
        "--card-gib",
        type=number(float, low=2, high=1024, example="--card-gib 24"),
        default=None,
        help="模擬這麼大的顯示卡：CUDA 記憶體上限設為卡的容量減 1 GiB（含模型）；"
        "表格列出峰值、餘裕與是否在上限的 95%% 內",
    )
    p.add_argument("--no-grads", action="store_true", help="不做槓桿（編譯、卸載）的梯度比對")
    p.add_argument("--no-original", action="store_true", help="不跑原始指南的對照列")
    p.add_argument(
        "--profile",
        action="store_true",
        help="計時的步驟之後再以 torch.profiler 記錄兩步（時間花在哪裡；第二步也記錄每個 Python 函式）",
    )
    p.set_defaults(func=_run_trainbench)


def _run_trainbench(args) -> int:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as every measured row
    from medgemma_lib.checks import trainbench  # handler import: see the module docstring

    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in trainbench.ROWS]
    if not archs or unknown:
        raise ConfigError(
            f"不認識的架構：{', '.join(unknown) or '（空白）'}。", hint=f"可用：{', '.join(trainbench.ROWS)}。"
        )
    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    names = {name for a in archs for name, _, _ in trainbench.ROWS[a]}
    if only is not None and (not only or set(only) - names):
        raise ConfigError(
            f"沒有這些列：{', '.join(sorted(set(only) - names)) or '（空白）'}。",
            hint=f"{', '.join(archs)} 的列：{', '.join(sorted(names))}。",
        )
    trainbench.run(
        archs,
        args.out,
        only=only,
        grads=not args.no_grads,
        original=not args.no_original,
        steps=args.steps,
        warmup=args.warmup,
        budget_s=args.budget_s,
        profile=args.profile,
        card_gib=args.card_gib,
        log=lambda line: print(line, flush=True),
    )
    print(f"結果已寫入 {args.out}/trainbench.json 與 trainbench.md")
    return 0


def _add_gradcheck(sub) -> None:
    p = sub.add_parser("gradcheck", help="比對訓練步驟的 LoRA 梯度與參考計算（示範模型；CPU 或 GPU）")
    p.add_argument("--json", help="把結果寫成 JSON 檔")
    p.add_argument(
        "overrides", nargs="*", metavar="區段.鍵=值", help="覆寫示範設定，例如 train.gradient_checkpointing=true"
    )
    p.set_defaults(func=_run_gradcheck)


def _run_gradcheck(args) -> int:
    from medgemma_lib.checks import gradcheck  # handler import: see the module docstring

    return gradcheck.check_and_report(args.overrides, json_path=args.json)


# Order here is the order in ``--help``.
COMMANDS = [
    _add_doctor,
    _add_config,
    _add_auth,
    _add_data,
    _add_models,
    _add_memory,
    _add_train,
    _add_demo,
    _add_evaluate,
    _add_quality,
    _add_chat,
    _add_export,
    _add_bench,
    _add_trainbench,
    _add_gradcheck,
]


def build_parser() -> argparse.ArgumentParser:
    parser = ChineseArgumentParser(
        prog="python -m medgemma_lib",
        description="MedGemma QLoRA 微調課程的命令列工具（與 notebooks 使用同一套函式）。",
    )
    parser.add_argument("--debug", action="store_true", help="發生錯誤時顯示完整的 Python traceback")
    sub = parser.add_subparsers(dest="command", metavar="指令", parser_class=ChineseArgumentParser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else EXIT_USER_ERROR
    debug = args.debug or os.environ.get("MEDGEMMA_DEBUG") == "1"
    try:
        code = args.func(args)
    except MedgemmaError as err:
        if debug:
            raise
        sys.stderr.write(f"{err.label}：{err.format()}\n")
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("\n已中斷（Ctrl+C）。\n")
        return 130
    return int(code or 0)
