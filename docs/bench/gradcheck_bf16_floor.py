"""How far does plain bf16 arithmetic alone move the LoRA gradients? (the floor for the bf16 gradient check)

    python docs/bench/gradcheck_bf16_floor.py --json out.json [overrides]     # on CUDA

Same packed batch and weights as ``python -m medgemma_lib gradcheck``; the plain per-example reference is computed
twice, in fp32 and in bf16, and compared tensor by tensor. A bf16 product whose distance to the fp32 reference is
of this size is as right as bf16 allows.
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

from medgemma_lib.checks import gradcheck

parser = argparse.ArgumentParser()
parser.add_argument("--json")
parser.add_argument("overrides", nargs="*")
args = parser.parse_args()
cfg = gradcheck.check_config(args.overrides)
with tempfile.TemporaryDirectory() as tmp:
    trainer = gradcheck.build_trainer(cfg, Path(tmp))
    inputs = gradcheck.first_packed_batch(trainer)
    examples = gradcheck.reference_examples(trainer, inputs)
    device = str(inputs["input_ids"].device)
    loss32, g32 = gradcheck.reference_gradients(trainer.model, examples, device)
    loss16, g16 = gradcheck.reference_gradients(trainer.model, examples, device, dtype=torch.bfloat16)
    lossp, gp = gradcheck.product_gradients(trainer, inputs)
floor, floor_layers, floor_worst = gradcheck.compare(g16, g32)
prod, prod_layers, prod_worst = gradcheck.compare(gp, g32)
print("| comparison | largest rel. diff | layer 0 | last layer | loss |")
print("|---|---:|---:|---:|---|")
last = max(floor_layers)
print(
    f"| plain bf16 reference vs fp32 reference | {floor:.2e} | {floor_layers[0]:.2e} | {floor_layers[last]:.2e} | "
    f"{loss16:.5f} vs {loss32:.5f} |"
)
print(
    f"| product (bf16) vs fp32 reference | {prod:.2e} | {prod_layers[0]:.2e} | {prod_layers[last]:.2e} | "
    f"{lossp:.5f} vs {loss32:.5f} |"
)
if args.json:
    Path(args.json).write_text(
        json.dumps(
            {
                "overrides": args.overrides,
                "floor": {"max": floor, "per_layer": floor_layers, "worst": floor_worst},
                "product": {"max": prod, "per_layer": prod_layers, "worst": prod_worst},
                "loss": {"fp32_reference": loss32, "bf16_reference": loss16, "product": lossp},
                "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            },
            indent=1,
        )
    )
