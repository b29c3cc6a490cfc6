"""Peak RAM and time of `export`'s merge paths on the real 4B / 27B architectures with random weights.

Usage (on a machine with the disk for the base model and the merged copy):

    python docs/bench/export_merge.py OUT_DIR --arch 4b --work /tmp/mm [--paths stream-cpu,stream-cuda,memory]

For each architecture it writes a random bf16 base folder shard by shard (``--shard-gib`` each, never the whole
model in RAM), a random LoRA r16 all-linear adapter in PEFT's file layout, then runs each merge path in its own
child process and records the child's peak RSS (``ru_maxrss``) and wall time. One merged tensor is checked against
``W + alpha/r · B·A`` computed here. The architecture is the text model (``bench.text_config``), keys
``model.layers.*`` as ``Gemma3ForCausalLM`` saves them; the 4B's vision tower (0.8 GB) is not included.
Prints a Markdown table and writes ``OUT_DIR/export_merge.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Gemma3ForCausalLM

from medgemma_lib.checks.random_models import text_config
from medgemma_lib.core.profiles import LORA_LINEAR_LAYERS

R, ALPHA = 16, 32


def write_base(arch: str, folder: Path, shard_gib: float, device: str) -> dict:
    """Random bf16 base weights, one shard in memory at a time, plus config.json and the index."""
    config = text_config(arch)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Gemma3ForCausalLM(config).state_dict().items()}
    shapes.pop("lm_head.weight", None)  # tied to the embedding, as the checkpoints save it
    folder.mkdir(parents=True, exist_ok=True)
    limit, shard, size, names, weight_map, total = shard_gib * 2**30, {}, 0, [], {}, 0
    gen = torch.Generator(device=device).manual_seed(0)

    def flush():
        nonlocal shard, size
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for key, shape in shapes.items():
        t = (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()
        if key.endswith("norm.weight"):
            t.zero_()
        shard[key] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= limit:
            flush()
    if shard:
        flush()
    final = {}
    for i, old in enumerate(names):  # the real naming: model-0000i-of-0000n
        new = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        (folder / old).rename(folder / new)
        final[old] = new
    weight_map = {k: final[v] for k, v in weight_map.items()}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config.dtype = torch.bfloat16
    config.save_pretrained(folder)
    return {"shards": len(names), "bytes": total}


def write_adapter(arch: str, folder: Path) -> int:
    """A random LoRA r16 adapter on every linear layer of every decoder layer, saved as PEFT saves it."""
    config = text_config(arch)
    with torch.device("meta"):
        model = Gemma3ForCausalLM(config)
    tensors, gen = {}, torch.Generator().manual_seed(1)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in LORA_LINEAR_LAYERS and ".layers." in name:
            out_f, in_f = module.weight.shape
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(R, in_f, generator=gen) * 0.01
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, R, generator=gen) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(LORA_LINEAR_LAYERS), task_type="CAUSAL_LM").save_pretrained(
        str(folder)
    )
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return len(tensors) // 2


CHILD = r"""
import sys, time, torch
from pathlib import Path
path, base, adapter, out = sys.argv[1:5]
t0 = time.time()
def hwm():  # this process's own peak RSS (VmHWM starts afresh at exec; ru_maxrss would keep the parent's)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print("IMPORTS_KIB", hwm())  # the interpreter and torch alone
if path.startswith("stream"):
    from medgemma_lib.export.merge import stream_merge
    out_p = Path(out); out_p.mkdir(parents=True)
    info = stream_merge(base, adapter, out_p, dtype="bfloat16", device="cuda" if path == "stream-cuda" else "cpu")
else:  # the in-memory path of `export --merge memory`: PEFT merge_and_unload on the whole bf16 model
    from peft import PeftModel
    from transformers import Gemma3ForCausalLM
    model = Gemma3ForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map="cpu")
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out, max_shard_size="5GB")
print("PEAK_KIB", hwm(), "SECONDS", time.time() - t0)
"""


def run_path(path: str, base: Path, adapter: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, path, str(base), str(adapter), str(out)], capture_output=True, text=True
    )
    wall = time.time() - t0
    row = {"path": path, "rc": proc.returncode, "wall_s": round(wall, 1)}
    for line in proc.stdout.splitlines():  # the child's own peak RSS (KiB), so rows do not share a maximum
        if line.startswith("IMPORTS_KIB"):
            row["imports_rss_gib"] = round(int(line.split()[1]) / 2**20, 2)
        if line.startswith("PEAK_KIB"):
            row["peak_rss_gib"] = round(int(line.split()[1]) / 2**20, 2)
            row["merge_s"] = round(float(line.split()[3]), 1)
    if proc.returncode:
        row["error"] = proc.stderr[-2000:]
    return row


def check_one(base: Path, adapter: Path, out: Path) -> float:
    """max |merged − (W + s·B·A)| for the first layer's q_proj, recomputed here in fp32."""
    key = "model.layers.0.self_attn.q_proj.weight"
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(base / index[key]), "pt") as f:
        w = f.get_tensor(key).float()
    out_index = out / "model.safetensors.index.json"
    name = json.loads(out_index.read_text())["weight_map"][key] if out_index.is_file() else "model.safetensors"
    with safe_open(str(out / name), "pt") as f:
        merged = f.get_tensor(key).float()
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        a = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    ref = (w + ALPHA / R * (b @ a)).to(torch.bfloat16).float()
    return float((merged - ref).abs().max())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--arch", default="4b")
    ap.add_argument("--work", default="/tmp/export-merge")
    ap.add_argument("--paths", default="stream-cpu,stream-cuda,memory")
    ap.add_argument("--merged-root", default=None, help="where merged copies go (default: --work)")
    ap.add_argument("--shard-gib", type=float, default=4.6)  # the real checkpoints' ~5 GB shards
    ap.add_argument("--keep-base", action="store_true", help="reuse a base already in --work, and leave it there")
    args = ap.parse_args()
    out_dir, work = Path(args.out), Path(args.work)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": []}
    for arch in args.arch.split(","):
        base, adapter = work / f"{arch}-base", work / f"{arch}-adapter"
        merged = Path(args.merged_root or work) / f"{arch}-merged"
        device = "cuda" if torch.cuda.is_available() else "cpu"
        t0 = time.time()
        if args.keep_base and (base / "model.safetensors.index.json").is_file() and adapter.is_dir():
            index = json.loads((base / "model.safetensors.index.json").read_text())
            info = {"shards": len(set(index["weight_map"].values())), "bytes": index["metadata"]["total_size"]}
            with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
                layers = sum(k.endswith("lora_A.weight") for k in f.keys())
        else:
            info = write_base(arch, base, args.shard_gib, device)
            layers = write_adapter(arch, adapter)
        info.update({"arch": arch, "write_s": round(time.time() - t0, 1), "lora_layers": layers})
        print(json.dumps(info), flush=True)
        for path in args.paths.split(","):
            if path == "stream-cuda" and not torch.cuda.is_available():
                continue
            row = {**info, **run_path(path, base, adapter, merged)}
            if row["rc"] == 0:
                row["max_abs_diff_q_proj_layer0"] = check_one(base, adapter, merged)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            (out_dir / "export_merge.json").write_text(json.dumps(results, indent=2))  # not atomic: a bench log
            shutil.rmtree(merged, ignore_errors=True)
        if not args.keep_base:
            shutil.rmtree(work, ignore_errors=True)
    print("| arch | path | base GB | shards | merge s | peak RSS GiB | of which imports | max diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results["rows"]:
        diff = r.get("max_abs_diff_q_proj_layer0", "—")
        print(
            f"| {r['arch']} | {r['path']} | {r['bytes'] / 1e9:.1f} | {r['shards']} | {r.get('merge_s', '—')} | "
            f"{r.get('peak_rss_gib', '—')} | {r.get('imports_rss_gib', '—')} | {diff} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
