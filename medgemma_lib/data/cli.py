"""``python -m medgemma_lib data prepare|stats``: the same functions the notebook calls."""

from __future__ import annotations

import argparse
import json
import sys
import time

from medgemma_lib.errors import ConfigError

# CLI option -> DataSection field (None means "not given": the YAML or default value stays).
_OVERRIDES = {
    "input": "input", "encoding": "encoding", "system_prompt": "system_prompt", "convert": "chinese_conversion",
    "max_answer_chars": "max_answer_chars", "long_answers": "long_answer_policy", "val_fraction": "validation_fraction",
    "test_fraction": "test_fraction", "seed": "seed", "deidentify": "deidentify",
    "max_train_examples": "max_train_examples", "max_eval_examples": "max_eval_examples",
}


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("data", help="資料準備：讀取、清理、切分、格式化問答資料", description="資料準備（notebook 03 的同一套函式）。")
    sub = parser.add_subparsers(dest="data_command", metavar="子指令", parser_class=type(parser))
    p = sub.add_parser("prepare", help="把問答檔準備成訓練用的 train/validation/test", description="讀取 CSV、JSONL 或 MedQuAD XML，清理、去識別化、切分（不洩漏主題）、格式化成 TRL 對話格式並存檔。")
    p.add_argument("--input", help="輸入檔：CSV、JSONL、MedQuAD XML 資料夾或 .tar.gz（預設：設定檔的 data.input）")
    p.add_argument("--output", help="輸出資料夾（splits/ 與 prepare_report.json）；不給則只顯示報告")
    p.add_argument("--columns", help="欄位對應，例如 question=ask,answer=answer,focus_area=department")
    p.add_argument("--encoding", help="檔案編碼（utf-8、utf-8-sig、cp950、gb18030、utf-16…）；不給則自動偵測")
    p.add_argument("--format", choices=["csv", "jsonl", "xml"], help="輸入格式；不給則依副檔名判斷")
    p.add_argument("--convert", choices=["s2t", "s2tw", "s2twp", "t2s", "tw2s"], help="OpenCC 繁簡轉換，例如 s2twp（簡體轉台灣正體）")
    p.add_argument("--system-prompt", help="可選的系統指示")
    p.add_argument("--max-answer-chars", type=int, help="答案長度上限（字元）")
    p.add_argument("--long-answers", choices=["truncate", "drop"], help="超長答案：truncate（句子邊界截斷）或 drop（捨棄）")
    p.add_argument("--val-fraction", type=float, help="驗證集比例（預設 0.1）")
    p.add_argument("--test-fraction", type=float, help="測試集比例（預設 0.1）")
    p.add_argument("--seed", type=int, help="切分用的亂數種子（預設 42）")
    p.add_argument("--deidentify", choices=["report", "mask", "refuse"], help="個資處理：report、mask 或 refuse（預設 report）")
    p.add_argument("--max-train-examples", type=int, help="最多保留幾筆訓練資料")
    p.add_argument("--max-eval-examples", type=int, help="驗證集最多保留幾筆（測試集不受影響，評估時另有上限）")
    p.add_argument("--config", help="YAML 設定檔（讀取其中的 data: 區段；命令列參數優先）")
    p.add_argument("--tokenizer", default="auto", help="計算 token 長度用的 tokenizer：demo、模型資料夾、none；預設 auto（示範模型已在快取時才計算）")
    p.add_argument("--overwrite", action="store_true", help="輸出資料夾已有先前的結果時取代它")
    p.add_argument("--json", action="store_true", help="以 JSON 印出完整報告")
    p.set_defaults(func=run_prepare)
    s = sub.add_parser("stats", help="顯示已準備資料夾的報告", description="讀取 data prepare 的輸出資料夾並顯示報告。")
    s.add_argument("folder", help="data prepare 的輸出資料夾")
    s.add_argument("--json", action="store_true", help="以 JSON 印出完整報告")
    s.set_defaults(func=run_stats)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def build_data_section(args: argparse.Namespace):
    """The DataSection from ``--config`` (or defaults) with command-line options on top."""
    from medgemma_lib.config import config_from_dict, load_config

    cfg = load_config(args.config) if args.config else load_config(None)
    data = {f: getattr(cfg.data, f) for f in cfg.data.__dataclass_fields__}
    for option, field in _OVERRIDES.items():
        value = getattr(args, option, None)
        if value is not None:
            data[field] = value
    if args.columns is not None:
        from medgemma_lib.data.clean import parse_column_mapping

        data["columns"] = parse_column_mapping(args.columns)
    if data.get("input") is None:
        raise ConfigError("沒有指定輸入檔。", hint="請加上 --input 檔案路徑。")
    # Re-validate through the config layer, so CLI values get the same checks and Chinese messages as YAML.
    return config_from_dict({"data": data}).data


def _load_tokenizer(choice: str):
    if choice == "none":
        return None, "略過 token 長度（--tokenizer none）"
    from medgemma_lib import models

    if choice == "auto":
        if not models.demo_model_cached():
            return None, "略過 token 長度：示範模型尚未下載轉換（執行 python -m medgemma_lib models --prepare-demo 後再試，或加 --tokenizer demo）"
        choice = "demo"
    return models.load_tokenizer(choice), None


def run_prepare(args: argparse.Namespace) -> int:
    from medgemma_lib.data.pipeline import prepare_from_config
    from medgemma_lib.data.report import format_report
    from medgemma_lib.data.storage import check_output_dir

    started = time.perf_counter()
    data_cfg = build_data_section(args)
    if args.output:
        check_output_dir(args.output, args.overwrite)  # before loading anything heavy
    tokenizer, note = _load_tokenizer(args.tokenizer)
    _, report = prepare_from_config(data_cfg, args.output, tokenizer=tokenizer, overwrite=args.overwrite, input_format=args.format)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        print(format_report(report))
        if note:
            print(note)
        if not args.output:
            print("（沒有 --output：只顯示報告，沒有存檔）")
        print(f"完成，用時 {time.perf_counter() - started:.1f} 秒。")
    sys.stdout.flush()
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from medgemma_lib.data.report import format_report
    from medgemma_lib.data.storage import load_prepared, load_report

    splits = load_prepared(args.folder)
    report = load_report(args.folder)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return 0
    print(format_report(report))
    print("目前資料夾中的筆數：" + "、".join(f"{name} {len(ds):,}" for name, ds in splits.items()))
    return 0
