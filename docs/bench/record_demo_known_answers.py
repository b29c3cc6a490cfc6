"""Record the demo conversion's known answers from a correct conversion (run under the pinned versions).

    python docs/bench/record_demo_known_answers.py      # writes medgemma_lib/resources/demo_known_answers.json

Known answers: the token ids of fixed strings (English, Traditional Chinese, Gemma's turn markers, the
chat template applied to a fixed MedQuAD pair) and the answer-token loss of that pair in fp32, with a
band of +-0.02 around it (CPU kernels differ by ~1e-5; a broken conversion under transformers 5.17 gave 6.6).
"""

import csv
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, Gemma3ForCausalLM

from medgemma_lib.models import loading as models

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "medgemma_lib" / "resources" / "demo_known_answers.json"

rows = {r["question"]: r for r in csv.DictReader(open(ROOT / "data" / "medquad_sample.csv", encoding="utf-8"))}
pair = rows["What are the treatments for Cardiofaciocutaneous syndrome ?"]
strings = {
    "english": "Diabetes is a chronic disease that affects how your body turns food into energy.",
    "traditional_chinese": "糖尿病是一種慢性疾病，會影響身體把食物轉換成能量的方式。",
    "turn_markers": "<start_of_turn>user\nWhat is glaucoma?<end_of_turn>\n<start_of_turn>model\n",
}
known = {
    "strings": strings,
    "pair": {"question": pair["question"], "answer": pair["answer"], "source": pair["source"]},
    "tokens": {},
    "answer_loss_band": [0.0, 1e9],
    "recorded_with": {},
}
OUT.write_text(
    json.dumps(known, ensure_ascii=False, indent=1), encoding="utf-8"
)  # measure_demo_answers reads strings/pair
models.check_demo_known_answers = models.measure_demo_answers  # recording: convert, measure, do not compare yet
folder = models.ensure_demo_model()
tok = AutoTokenizer.from_pretrained(str(folder))
model = Gemma3ForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True)
measured = models.measure_demo_answers(tok, model)
versions = models.library_versions()
known.update(
    tokens=measured["tokens"],
    answer_loss=round(measured["answer_loss"], 5),
    answer_loss_band=[round(measured["answer_loss"] - 0.02, 4), round(measured["answer_loss"] + 0.02, 4)],
    recorded_with={k: versions[k] for k in ("transformers", "tokenizers", "gguf")},
)
OUT.write_text(json.dumps(known, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
print(
    json.dumps({k: known[k] for k in ("answer_loss", "answer_loss_band", "recorded_with")}),
    {k: len(v) for k, v in known["tokens"].items()},
)
