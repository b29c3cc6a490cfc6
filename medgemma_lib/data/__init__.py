"""Data preparation (notebook 03): read, clean, de-identify, split without leakage, format for Gemma.

Public API::

    splits, report = prepare_from_config(cfg.data, output_dir="prepared/medquad", tokenizer=tok)
    splits = load_prepared("prepared/medquad")
    example = label_mask_example(tok, splits["train"][0])   # what TRL trains on, token by token

``data.mix`` (other sources, e.g. Chinese QA converted with s2twp) joins train by fraction and adds ``test_mix``.

Modules: ``readers`` (CSV/JSONL/XML), ``encodings`` (strict decoding, detection), ``clean`` (HTML cleanup, validation,
counted drops),
``split`` (focus-area/question groups, stratified by source), ``formatting`` (records, OpenCC),
``lengths`` (token lengths, histogram, recommended max length), ``masking`` (trained vs masked
tokens), ``storage`` (atomic save/load), ``report`` (Chinese summary), ``samples`` (shipped samples),
the command line is ``medgemma_lib.cli`` (``python -m medgemma_lib data ...``).
"""

from medgemma_lib.data.clean import (
    CLEAN_COUNTS,
    DROP_REASONS,
    clean_rows,
    parse_column_mapping,
    strip_html,
    truncate_at_sentence,
)
from medgemma_lib.data.formatting import (
    answer_of,
    chinese_converter,
    find_record,
    format_record,
    question_of,
    to_record,
)
from medgemma_lib.data.lengths import (
    cut_length_table,
    length_report,
    length_table,
    plot_token_lengths,
    recommend_max_length,
    token_lengths,
)
from medgemma_lib.data.masking import decoded_labels, format_masking, label_mask_example, masking_table
from medgemma_lib.data.pipeline import MIX_RULES, mix_problems, prepare_from_config, prepare_records, to_dataset_dict
from medgemma_lib.data.readers import RawTable, read_table
from medgemma_lib.data.report import counts_table, format_report, mix_table, splits_table
from medgemma_lib.data.split import (
    all_records,
    crossing_keys,
    focus_areas_by_split,
    leakage_groups,
    split_by_focus_area,
    split_sizes,
)
from medgemma_lib.data.storage import (
    REPORT_NAME,
    check_output_dir,
    differing_splits,
    load_prepared,
    load_report,
    save_prepared,
)

__all__ = [
    "CLEAN_COUNTS",
    "DROP_REASONS",
    "MIX_RULES",
    "REPORT_NAME",
    "RawTable",
    "all_records",
    "answer_of",
    "check_output_dir",
    "chinese_converter",
    "clean_rows",
    "counts_table",
    "crossing_keys",
    "cut_length_table",
    "decoded_labels",
    "differing_splits",
    "find_record",
    "focus_areas_by_split",
    "format_masking",
    "format_record",
    "format_report",
    "label_mask_example",
    "leakage_groups",
    "length_report",
    "length_table",
    "load_prepared",
    "load_report",
    "masking_table",
    "mix_problems",
    "mix_table",
    "parse_column_mapping",
    "plot_token_lengths",
    "prepare_from_config",
    "prepare_records",
    "question_of",
    "read_table",
    "recommend_max_length",
    "save_prepared",
    "split_by_focus_area",
    "split_sizes",
    "splits_table",
    "strip_html",
    "to_dataset_dict",
    "to_record",
    "token_lengths",
    "truncate_at_sentence",
]
