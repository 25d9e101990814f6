"""Tensor and pipeline parallelism on a bigger machine: decode tokens/s of a random ~1B-parameter
Llama-shaped model (int4) at TP = 1, 2, 4 and PP = 2, the cores shared out among the ranks.

    python benchmarks/parallel_scaling.py [--layers 16] [--out DIR]

Each configuration runs in its own process (one model-parallel group per process), one after
another; each prints its figures as one JSON line. The machine used is named in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(directory: Path, layers: int) -> None:
    """A random Llama of TinyLlama-1.1B's shape, saved as a transformers model directory."""
    import torch
    import transformers

    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny_models import build_tokenizer

    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)


def measure(directory: str, tp: int, pp: int, device: str) -> dict:
    from nanoinfer import LLM, SamplingParams

    quantization = "int4" if device == "cpu" else "none"
    dtype = "auto" if device == "cpu" else "bfloat16"
    llm = LLM(directory, dtype=dtype, quantization=quantization, device=device, max_model_len=1024,
              tensor_parallel_size=tp, pipeline_parallel_size=pp)  # fmt: skip
    import torch

    out = {"tp": tp, "pp": pp, "device": device, "threads_rank0": torch.get_num_threads()}
    try:
        params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
        prompt = list(range(5, 69))
        llm.generate([prompt], params)
        for batch in (1, 16):
            best = 0.0
            for _ in range(2):
                start = time.perf_counter()
                llm.generate([prompt] * batch, params)
                best = max(best, batch * 32 / (time.perf_counter() - start))
            out[f"batch{batch}_tok_s"] = round(best, 1)
        group = llm.engine.model_parallel
        if group is not None and group.comm is not None:
            out["exchange_s"] = round(group.comm.seconds, 3)
    finally:
        llm.engine.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--dir", type=Path, default=Path("/tmp/nanoinfer-scaling-model"))
    p.add_argument("--configs", default="1x1,2x1,4x1,1x2", help="TPxPP list")
    p.add_argument("--device", default="cpu")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        tp, pp = (int(x) for x in args.one.split("x"))
        print(json.dumps(measure(str(args.dir), tp, pp, args.device)), flush=True)
        return
    if not (args.dir / "config.json").exists():
        build(args.dir, args.layers)
    print(json.dumps({"cores": os.cpu_count()}), flush=True)
    for config in args.configs.split(","):
        cmd = [sys.executable, __file__, "--dir", str(args.dir), "--device", args.device, "--one", config]
        run = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else json.dumps({"config": config, "error": run.stderr[-800:]}), flush=True)


if __name__ == "__main__":
    main()
