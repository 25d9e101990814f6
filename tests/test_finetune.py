"""Fine-tuning: data formats and their errors, the dense training path against transformers, LoRA
adapters both ways with PEFT (ours load in PEFT, PEFT's load in ours, same logits), full
fine-tuning written as a HF directory both libraries load, resuming from a checkpoint exactly,
and a small version of the seed's loop whose held-out loss falls."""

from __future__ import annotations

import json
import subprocess
import sys

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from nanoinfer.adapters.peft_files import load_into, read_adapter
from nanoinfer.loading import load_package
from nanoinfer.model.lora import LoRASpec, apply_lora, merge_lora
from nanoinfer.model.transformer import Transformer
from nanoinfer.train import DataError, FinetuneConfig, Trainer, finetune
from nanoinfer.train.data import IGNORE, load_examples

WORDS = ["fox", "dog", "cat", "owl", "bee", "ant", "elk", "emu", "yak", "cod", "hen", "pig"]


def _ours(path, adapter=None) -> Transformer:
    model = Transformer.from_package(load_package(str(path)), torch.float32)
    if adapter is not None:
        spec, weights = read_adapter(adapter, model.config.num_layers)
        load_into(apply_lora(model, model.config, spec), weights)
    return model


@pytest.fixture()
def word_data(tmp_path):
    train = [f"the word {w} reads {w[::-1]}" for w in WORDS for _ in range(6)]
    (tmp_path / "train.txt").write_text("\n".join(train))
    (tmp_path / "val.txt").write_text("\n".join(train[::6]))
    return tmp_path


# ---- data -----------------------------------------------------------------------------------


def test_data_formats_label_only_what_must_be_learned(tiny_model, tmp_path):
    path, _ = tiny_model("llama")
    tok = load_package(str(path)).tokenizer
    rows = [
        {"prompt": "Q: fox?", "completion": " A: xof"},
        {"messages": [{"role": "user", "content": "fox?"}, {"role": "assistant", "content": "xof"}]},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    completion, chat = load_examples(tmp_path / "d.jsonl", tok, 64, 256)
    learned = [t for t, label in zip(completion.input_ids, completion.labels) if label != IGNORE]
    assert tok.decode(learned) == " A: xof" and learned[-1] in tok.eos_token_ids
    learned = [t for t, label in zip(chat.input_ids, chat.labels) if label != IGNORE]
    assert tok.decode(learned, skip_special_tokens=False) == "xof<|im_end|>\n"
    (tmp_path / "t.txt").write_text("the quick brown fox\n\njumps over the lazy dog\n" * 20)
    blocks = load_examples(tmp_path / "t.txt", tok, 16, 256)
    assert all(len(b.input_ids) <= 16 and b.labels == b.input_ids for b in blocks) and len(blocks) > 5


@pytest.mark.parametrize(
    "content, words",
    [
        ('{"prompt": "a", "completion": "b"}\n{not json\n', "d.jsonl:2: not valid JSON"),
        ('{"text": "a"}\n', "d.jsonl:1: expected"),
        ('{"prompt": "a", "completion": "' + "word " * 400 + '"}\n', "d.jsonl:1: the example has"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "d.jsonl:1: nothing to learn"),
        ("\n\n", "holds no training examples"),
    ],
)
def test_bad_data_fails_before_training_with_the_line(tiny_model, tmp_path, content, words):
    path, _ = tiny_model("llama")
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(DataError, match=words):
        Trainer(FinetuneConfig(model=str(path), data=str(tmp_path / "d.jsonl"), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_data_and_exits_nonzero(tiny_model, tmp_path):
    path, _ = tiny_model("llama")
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n[1,\n')
    cmd = [sys.executable, "-m", "nanoinfer.cli", "finetune", "--model", str(path), "--data", str(tmp_path / "d.jsonl")]
    done = subprocess.run([*cmd, "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "d.jsonl:2: not valid JSON" in done.stderr, done.stderr


def test_cli_trains_an_adapter(tiny_model, word_data):
    path, _ = tiny_model("llama")
    out = word_data / "cli"
    args = ["--model", str(path), "--data", str(word_data / "train.txt"), "--eval-data", str(word_data / "val.txt")]
    args += ["--output", str(out), "--lora-target", "q_proj, down_proj", "--lora-r", "4", "--max-steps", "3"]
    cmd = [sys.executable, "-m", "nanoinfer.cli", "finetune", *args, "--block-size", "32", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "3 steps" in done.stdout, done.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["down_proj", "q_proj"]


# ---- the training path and adapters against the oracles ---------------------------------------


@pytest.mark.parametrize("case_id", ["llama", "qwen3", "gemma3", "qwen3_moe", "deepseek_v3"])
def test_dense_training_forward_matches_transformers(tiny_model, case_id):
    path, hf = tiny_model(case_id)
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
    got = _ours(path).forward_dense(ids)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_chunked_linear_cross_entropy_equals_the_plain_one(monkeypatch, softcap):
    """Loss and both gradients of the fused LM head + loss against logits -> cross_entropy, over
    several chunks (the last one short) and ignored positions."""
    from nanoinfer.train import loss as loss_module

    monkeypatch.setattr(loss_module, "CHUNK_VALUES", 7 * 50)  # 7 rows a chunk
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    targets[::4] = IGNORE
    logits = hidden @ weight.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    want = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE)
    (want * 3).backward()
    want_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = loss_module.linear_cross_entropy(hidden, weight, targets, IGNORE, softcap)
    (got * 3).backward()
    assert torch.allclose(got, want)
    assert torch.allclose(hidden.grad, want_grads[0]) and torch.allclose(weight.grad, want_grads[1])


@pytest.mark.parametrize("case_id", ["llama", "qwen3", "gemma3"])
def test_our_trained_adapter_loads_in_peft_with_the_same_logits(tiny_model, word_data, case_id):
    path, hf = tiny_model(case_id)
    out = word_data / f"lora_{case_id}"
    targets = ("q_proj", "v_proj", "down_proj") if case_id == "llama" else ("q_proj", "v_proj")
    finetune(
        model=str(path),
        data=str(word_data / "train.txt"),
        output=str(out),
        lora_target=targets,
        epochs=1,
        batch_size=8,
        block_size=32,
        lr=1e-2,
        progress=False,
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == sorted(targets)
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    peft_model = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    try:
        with torch.no_grad():
            expected = peft_model(ids).logits
        ours = _ours(path, out)
        assert torch.allclose(ours.forward_dense(ids), expected, atol=1e-4)
        assert torch.allclose(ours.score(ids[0].tolist()), expected[0], atol=1e-4)  # the serving path too
        base = _ours(path).forward_dense(ids)
        assert (base - expected).abs().max() > 1e-3, "the adapter changed nothing"
    finally:
        peft_model.unload()  # give the shared fixture model back without adapters


def test_an_adapter_trained_by_peft_loads_in_nanoinfer(tiny_model, tmp_path):
    path, _ = tiny_model("qwen3")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["k_proj", "o_proj", "up_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(hf, config)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # PEFT starts B at zero: give it something to carry
    model.save_pretrained(tmp_path / "peft")
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids).logits
    ours = _ours(path, tmp_path / "peft")
    assert torch.allclose(ours.forward_dense(ids), expected, atol=1e-4)
    merge_lora(ours)  # folded into the base weights: the same answer without the extra matmuls
    assert torch.allclose(ours.forward_dense(ids), expected, atol=1e-4)


def test_adapters_we_cannot_apply_exactly_are_refused(tiny_model, tmp_path):
    path, _ = tiny_model("llama")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(Exception, match="adapter"):
        read_adapter(tmp_path / "a", 2)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        LoRASpec(r=8, alpha=16, targets=("qkv",))


# ---- full fine-tuning -----------------------------------------------------------------------


@pytest.mark.parametrize("case_id", ["gemma3", "mixtral", "phi3_longrope"])
def test_full_finetune_writes_a_directory_both_libraries_load(tiny_model, word_data, case_id):
    path, _ = tiny_model(case_id)
    out = word_data / f"full-{case_id}"
    trainer = Trainer(
        FinetuneConfig(
            model=str(path),
            data=str(word_data / "train.txt"),
            output=str(out),
            method="full",
            epochs=1,
            batch_size=8,
            block_size=32,
            lr=1e-3,
            progress=False,
        )
    )
    trainer.train()
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(3))
    trained = trainer.model.forward_dense(ids).detach()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, trained, atol=1e-4)
    assert torch.allclose(_ours(out).forward_dense(ids), trained, atol=1e-5)
    assert (out / "loss_curve.png").stat().st_size > 1000
    log = json.loads((out / "train_log.json").read_text())["log"]
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(log[-1])


def test_gguf_base_trains_lora_and_full_writes_safetensors(tmp_path, smollm_path):
    """SmolLM2's Q4_1 GGUF: LoRA against its dequantized weights; full fine-tuning writes a HF
    directory (config.json from our ModelConfig, tokenizer.json from the GGUF's vocabulary)."""
    (tmp_path / "t.txt").write_text("\n".join(f"The 杨语 of {w} is {w.upper()}." for w in WORDS))
    for method in ("lora", "full"):
        out = tmp_path / method
        trainer = Trainer(
            FinetuneConfig(
                model=str(smollm_path),
                data=str(tmp_path / "t.txt"),
                output=str(out),
                method=method,
                max_steps=1,
                batch_size=2,
                block_size=32,
                progress=False,
            )
        )
        trainer.train()
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[1, 504, 3458, 282, 314, 2752, 28, 9135]])
    trained = trainer.model.forward_dense(ids).detach()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full", torch_dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, trained, atol=1e-3)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "full")
    assert tok("The 杨语 of fox")["input_ids"] == load_package(str(tmp_path / "full")).tokenizer.encode(
        "The 杨语 of fox"
    )


# ---- the loop -------------------------------------------------------------------------------


def test_held_out_loss_falls_and_resume_continues_exactly(tiny_model, word_data, monkeypatch):
    path, _ = tiny_model("llama")
    common = dict(
        model=str(path),
        data=str(word_data / "train.txt"),
        eval_data=str(word_data / "val.txt"),
        epochs=3,
        batch_size=4,
        grad_accum=2,
        block_size=32,
        lr=5e-3,
        progress=False,
    )
    straight = finetune(output=str(word_data / "a"), **common)
    assert straight.eval_losses[-1] < straight.eval_losses[0] - 0.3, straight.eval_losses
    # The same run, stopped after its first epoch and resumed from the checkpoint.
    real_epoch = Trainer._train_epoch
    calls = []

    def stop_after_one(self, *args):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_epoch(self, *args)

    monkeypatch.setattr(Trainer, "_train_epoch", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        finetune(output=str(word_data / "b"), **common)
    monkeypatch.setattr(Trainer, "_train_epoch", real_epoch)
    resumed = finetune(output=str(word_data / "b"), resume=True, **common)
    assert resumed.eval_losses == straight.eval_losses
    a, b = (load_file(str(word_data / d / "adapter_model.safetensors")) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bfloat16_autocast_trains(tiny_model, word_data):
    path, _ = tiny_model("qwen3")
    result = finetune(
        model=str(path),
        data=str(word_data / "train.txt"),
        eval_data=str(word_data / "val.txt"),
        output=str(word_data / "bf16"),
        dtype="bfloat16",
        epochs=2,
        batch_size=8,
        block_size=32,
        lr=1e-2,
        progress=False,
    )
    assert result.eval_losses[-1] < result.eval_losses[0]


def test_the_seeds_experiment_runs_end_to_end(tiny_model, tmp_path):
    """`make yangyu` on a tiny model: base, LoRA and full rows, each fine-tune lowering held-out loss."""
    from nanoinfer.bench.yangyu import main

    path, _ = tiny_model("llama")
    args = ["--model", str(path), "--out", str(tmp_path), "--lora-epochs", "1", "--full-epochs", "1"]
    assert main([*args, "--block-size", "64", "--batch-size", "8"]) == 0
    rows = json.loads((tmp_path / "yangyu.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["base", "LoRA", "full"]
    assert all(0 <= r["exact_match"] <= 1 and r["perplexity"] > 1 for r in rows)
    assert all(r["eval_losses"][-1] < r["eval_losses"][0] for r in rows[1:])
    assert "| LoRA |" in (tmp_path / "yangyu.md").read_text()
