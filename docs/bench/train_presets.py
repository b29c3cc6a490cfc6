"""Full-depth train.py runs of the GPU presets on random-weight MedGemma architectures (NF4), one H200.

Measures what bench cannot: the product's own training path (run_training: TRL SFTTrainer, TRL's chunked
LM-head loss, Liger layer kernels, varlen attention, checkpoint + SHA-256 marker) at full depth.
Usage (on the GPU machine, from the project root, with the demo tokenizer files in .gpu/tok/:
tokenizer.json.xz, tokenizer_config.json, chat_template.jinja):
  python docs/bench/train_presets.py OUT_DIR 27b:configs/medgemma-27b-24gb.yaml:6
  python docs/bench/train_presets.py OUT_DIR 4b:configs/medgemma-4b-8gb.yaml:8   # one process per run
"""

import gc
import json
import lzma
import shutil
import sys
import time
from pathlib import Path

import torch

from medgemma_lib.checks import bench, random_models
from medgemma_lib.core.config import load_config
from medgemma_lib.models.loading import load_tokenizer
from medgemma_lib.training import checkpoints
from medgemma_lib.training.monitor import read_log
from medgemma_lib.training.train import run_training

out_dir = Path(sys.argv[1])
device = "cuda" if torch.cuda.is_available() else "cpu"
results = {"env": bench.environment()}
for spec in sys.argv[2:]:
    arch, preset, steps = spec.split(":")
    folder = Path(f"/tmp/m-{arch}")
    folder.mkdir(parents=True, exist_ok=True)
    tok = Path(".gpu/tok")
    (folder / "tokenizer.json").write_bytes(lzma.decompress((tok / "tokenizer.json.xz").read_bytes()))
    for f in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tok / f, folder / f)
    cfgobj = random_models.text_config(arch)
    cfgobj.architectures = ["Gemma3ForCausalLM"]
    cfgobj.save_pretrained(folder)
    model, info = random_models.build_model(arch, device)
    tokenizer = load_tokenizer(str(folder))
    run_name = f"{arch}-{Path(preset).stem}"
    cfg = load_config(
        preset,
        [
            f"model.profile={folder}",
            f"train.max_steps={steps}",
            "train.logging_steps=1",
            "train.eval_steps=1000",
            "train.save_steps=1000",
            f"train.run_name={run_name}",
            "train.output_dir=/tmp/res",
            "data.max_eval_examples=16",
        ],
    )
    t0 = time.time()
    r = run_training(cfg, model=model, tokenizer=tokenizer, verbose=True)
    wall = time.time() - t0
    run = Path(r.run_dir)
    recs = [x for x in read_log(run / "train_log.jsonl") if "loss" in x and "num_tokens" in x]
    steady = None
    if len(recs) >= 3:
        a, b = recs[1], recs[-1]
        steady = (float(b["num_tokens"]) - float(a["num_tokens"])) / max(1e-9, b["time_s"] - a["time_s"])
    ck = checkpoints.latest_complete_checkpoint(run / "checkpoints")
    ck_bytes = sum(p.stat().st_size for p in ck.rglob("*") if p.is_file()) if ck else None
    t1 = time.time()
    checkpoints.write_completion_marker(ck)
    marker_s = time.time() - t1
    t1 = time.time()
    problem = checkpoints.checkpoint_problem(ck)
    verify_s = time.time() - t1
    row = {
        "arch": arch,
        "preset": preset,
        "build": info,
        "wall_s": round(wall, 1),
        "steady_tokens_per_s": round(steady, 1) if steady else None,
        "checkpoint_gib": round(ck_bytes / 2**30, 3) if ck_bytes else None,
        "marker_write_s": round(marker_s, 2),
        "marker_verify_s": round(verify_s, 2),
        "checkpoint_ok": problem is None,
        "memory": r.memory,
        "summary": {k: v for k, v in r.to_dict().items() if k != "memory_advice"},
        "log": recs,
    }
    results[run_name] = row
    print(
        json.dumps({k: v for k, v in row.items() if k not in ("log", "summary", "build")}, ensure_ascii=False),
        flush=True,
    )
    (out_dir / "presets.json").write_text(json.dumps(results, ensure_ascii=False, indent=1, default=str))
    del model, r, tokenizer
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    shutil.rmtree("/tmp/res", ignore_errors=True)
