"""LoRA training tokens/s, nanoinfer vs transformers + peft (a plain loop), on SmolLM2 in float32 with
the same batch (8 x 128 random tokens), r=8 alpha=16 on q_proj,v_proj, steps interleaved.

    .venv/bin/python benchmarks/lora_train_speed.py
"""

import pathlib
import tempfile
import time

import peft
import torch
import transformers

from nanoinfer.loading import load_package
from nanoinfer.model.lora import LoRASpec, apply_lora
from nanoinfer.model.transformer import Transformer
from nanoinfer.train.export import save_hf_model
from nanoinfer.train.finetune import token_loss

torch.manual_seed(0)
B, T, STEPS = 8, 128, 4
ids = torch.randint(10, 40000, (B, T))
batch = {"input_ids": ids, "labels": ids.clone()}
pkg = load_package("smollm2-135m-instruct")
ours = Transformer.from_package(pkg, torch.float32)
d = pathlib.Path(tempfile.mkdtemp())
save_hf_model(ours, pkg, d)
ours.requires_grad_(False)
apply_lora(ours, ours.config, LoRASpec(8, 16, ("q_proj", "v_proj"), 0.05))
opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)
hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
hf = peft.get_peft_model(
    hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05)
)
hopt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4)


def step_ours():
    loss, _ = token_loss(ours, batch, False)
    loss.backward()
    opt.step()
    opt.zero_grad()


def step_hf():
    out = hf(input_ids=ids, labels=ids)
    out.loss.backward()
    hopt.step()
    hopt.zero_grad()


ours.train()
hf.train()
step_ours()
step_hf()  # warm-up
res = {"nanoinfer": [], "peft": []}
for r in range(STEPS):
    for name, fn in (("nanoinfer", step_ours), ("peft", step_hf)):
        t = time.perf_counter()
        fn()
        res[name].append(B * T / (time.perf_counter() - t))
import statistics

m = {k: statistics.median(v) for k, v in res.items()}
print(
    f"tokens/s median of {STEPS} interleaved steps (B={B}, T={T}): nanoinfer {m['nanoinfer']:.0f}, transformers+peft {m['peft']:.0f}, ratio {m['nanoinfer'] / m['peft']:.2f}x"
)
