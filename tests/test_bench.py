"""The benchmark harness: peers measure the same workload, and the report shows ratios."""

from __future__ import annotations

import json
import time
from argparse import Namespace

from nanoinfer.bench import http_serving
from nanoinfer.bench.compare import main, run_engines
from nanoinfer.bench.peers import ClosedLoop, NanoinferPeer, Request, TransformersPeer
from nanoinfer.bench.report import markdown
from nanoinfer.bench.spec import lockstep_tok_s, run_in_lockstep
from nanoinfer.kernels import cpu_flags
from nanoinfer.quant import weight_bytes


def test_serving_timings_and_report(tiny_model, tmp_path):
    directory, _ = tiny_model("llama")
    requests = [Request(list(range(10, 10 + n)), m) for n, m in ((20, 5), (30, 3), (12, 6))]
    nano = NanoinferPeer(str(directory))
    hf = TransformersPeer(directory)
    for peer in (nano, hf):
        timings = peer.serve(requests, concurrency=2)
        assert [t.output_len for t in timings] == [5, 3, 6]
        assert all(t.submit <= t.first_token <= t.finish for t in timings)
        assert peer.prefill(list(range(10, 40))) > 0 and peer.decode(list(range(10, 20)), 4) > 0
    serving = {"output_tok_s": 100.0, "ttft_p50": 0.1, "ttft_p99": 0.2, "tpot_p50": 0.01, "tpot_p99": 0.02}
    results = {
        "model": "tiny",
        "machine": {"cpu": "x", "cores": 2, "threads": 2, "torch": "2"},
        "engines": {
            "nanoinfer": {"info": {}, "tg128": {"tok_s": 50.0}, "serving": {"16": serving}},
            "transformers": {
                "info": {},
                "tg128": {"tok_s": 10.0},
                "serving": {"16": {**serving, "output_tok_s": 25.0}},
            },
        },
    }
    table = markdown(results)
    assert "| tg128 (tok/s) | 50.0 | 10.0 | 5.00× |" in table
    assert "| serving c=16: output tok/s | 100.0 | 25.0 | 4.00× |" in table


class _RecordingPeer:
    """Stands in for an engine: logs each call, answers in a fixed time."""

    def __init__(self, name: str, calls: list[str]):
        self.name, self.calls = name, calls

    def describe(self) -> dict:
        return {}

    def prefill(self, ids: list[int]) -> float:
        self.calls.append(f"{self.name}:prefill")
        return 0.5

    def decode(self, ids: list[int], n: int) -> float:
        self.calls.append(f"{self.name}:decode")
        return 2.0


def test_closed_loops_in_lockstep_keep_their_own_clocks(tiny_model):
    """Two engines taking turns step by step: each answers every request as it would alone, and
    each clock holds only its own steps, so together they are no longer than the run."""
    directory, _ = tiny_model("llama")
    peers = {name: NanoinferPeer(str(directory)) for name in ("a", "b")}
    requests = [Request(list(range(10, 10 + n)), m) for n, m in ((20, 5), (30, 3), (12, 6))]
    alone = ClosedLoop(peers["a"], requests, 2, stop_at_eos=True)
    while not alone.done:
        alone.step()
    start = time.perf_counter()
    loops = {name: ClosedLoop(peer, requests, 2, stop_at_eos=True) for name, peer in peers.items()}
    run_in_lockstep(loops)
    wall = time.perf_counter() - start
    for loop in loops.values():
        assert loop.token_ids == alone.token_ids
        assert all(0 < len(ids) <= r.output_len for ids, r in zip(loop.token_ids.values(), requests))
        assert all(t.submit <= t.first_token <= t.finish <= loop.busy_s for t in loop.timings())
    assert sum(loop.busy_s for loop in loops.values()) <= wall
    assert set(lockstep_tok_s(peers, requests, 2)) == {"a", "b"}


def test_engines_run_in_rounds():
    calls: list[str] = []
    peers = {name: _RecordingPeer(name, calls) for name in ("a", "b")}
    args = Namespace(scenarios="pp512,tg128", repeats=2)
    results = run_engines(peers, args, list(range(100, 200)), log=lambda msg: None)
    # a warm-up each, then rounds of one run per engine, so drift hits every engine alike; the
    # rounds alternate direction, so neither engine always runs first
    ab, ba = ["a:prefill", "b:prefill"], ["b:prefill", "a:prefill"]
    assert calls == ab + ab + ba + [c.replace("prefill", "decode") for c in ab + ab + ba]
    assert results["a"]["pp512"] == {"tok_s": 1024.0, "samples_s": [0.5, 0.5]}
    assert results["b"]["tg128"]["tok_s"] == 64.0


def test_spec_scenario(tiny_model, tmp_path, capsys):
    """The spec scenario end to end on a tiny model: speculation off vs n-gram, transformers' own
    prompt lookup beside it, a serving pass, and the report's tables."""
    directory, _ = tiny_model("llama")
    sets = {"input-grounded": ["the quick brown fox the quick brown fox the quick"], "free-form": ["Hello world"]}
    (tmp_path / "w.json").write_text(json.dumps(sets))
    args = ["--model", str(directory), "--engines", "nanoinfer,transformers", "--scenarios", "spec"]
    args += ["--repeats", "1", "--out", str(tmp_path), "--spec-workloads", str(tmp_path / "w.json")]
    args += ["--spec-max-tokens", "12", "--spec-concurrency", "2", "--spec-requests", "3", "--spec-prompts", "1"]
    assert main(args) == 0
    results = json.loads((tmp_path / "latest.json").read_text())
    nano = results["engines"]["nanoinfer"]["spec"]
    assert list(nano["batch1"]) == ["baseline", "ngram k=4", "ngram k=8"]
    for setting, workloads in nano["batch1"].items():
        assert list(workloads) == ["input-grounded", "free-form"]
        for row in workloads.values():
            assert row["identical"] is True  # greedy speculation is lossless
            assert row["tok_s"] > 0 and 1 <= row["generated_tokens"] <= 12
            assert row["tokens_per_forward"] >= 1
            assert (row["acceptance"] is None) == (setting == "baseline" or row["draft_tokens"] == 0)
    assert nano["batch1"]["baseline"]["free-form"]["tokens_per_forward"] == 1.0
    assert sum(row["draft_tokens"] for row in nano["batch1"]["ngram k=4"].values()) > 0  # the tiny model repeats
    serving = nano["serving"]["2"]
    assert serving["baseline"]["free-form"]["ratio"] == 1.0 and serving["ngram k=4"]["free-form"]["output_tok_s"] > 0
    hf = results["engines"]["transformers"]["spec"]["batch1"]
    assert list(hf) == ["baseline", "prompt lookup k=10"]
    assert hf["prompt lookup k=10"]["input-grounded"]["identical"] is True
    table = capsys.readouterr().out
    assert "| nanoinfer | ngram k=4 | input-grounded |" in table
    assert "| transformers | prompt lookup k=10 | free-form |" in table
    assert "| setting | workload | output tok/s | vs baseline |" in table
    assert "| figure |" not in table  # no other scenario ran


def test_structured_scenario(tiny_model, tmp_path, capsys):
    """The structured scenario end to end on a tiny model: constrained vs free serving, TTFT with a
    fresh schema, mask times, and the report's table."""
    directory, _ = tiny_model("llama")
    args = ["--model", str(directory), "--engines", "nanoinfer", "--scenarios", "structured", "--repeats", "1"]
    args += ["--out", str(tmp_path), "--structured-requests", "4", "--structured-concurrency", "2"]
    args += ["--structured-max-tokens", "12"]
    assert main(args) == 0
    result = json.loads((tmp_path / "latest.json").read_text())["engines"]["nanoinfer"]["structured"]
    assert result["output_tok_s"]["free"] > 0 and result["output_tok_s"]["json_schema"] > 0
    assert result["ratio"] == result["output_tok_s"]["json_schema"] / result["output_tok_s"]["free"]
    assert result["ttft_ms"]["new_schema"] > 0 and 0 < result["mask_ms_p50"] <= result["mask_ms_p90"]
    assert "| serving output tok/s |" in capsys.readouterr().out


def test_lora_scenario(tiny_model, tmp_path, capsys):
    """The lora scenario end to end on a tiny model: our Trainer's steps against transformers +
    peft on the same batches, serving through several adapters against the base, the table."""
    directory, _ = tiny_model("llama")
    args = ["--model", str(directory), "--engines", "nanoinfer", "--scenarios", "lora", "--repeats", "1"]
    args += ["--out", str(tmp_path), "--lora-requests", "4", "--lora-concurrency", "2", "--lora-batch-size", "2"]
    args += ["--lora-adapters", "2", "--input-len", "8,16", "--output-len", "4,8"]
    assert main(args) == 0
    result = json.loads((tmp_path / "latest.json").read_text())["engines"]["nanoinfer"]["lora"]
    train, serve = result["training"], result["serving"]
    assert train["ratio"] == train["tok_s"]["nanoinfer"] / train["tok_s"]["transformers+peft"] > 0
    assert len(train["samples_s"]["nanoinfer"]) == 5 and serve["adapters"] == 2
    assert serve["ratio"] == serve["output_tok_s"]["adapters"] / serve["output_tok_s"]["base"] > 0
    assert "| LoRA training tok/s (reference: transformers + peft) |" in capsys.readouterr().out


def test_mla_scenario(tmp_path, capsys):
    """The mla scenario: a DeepSeek-V2-Lite-shaped layer, latent against full K/V, and its table."""
    args = ["--engines", "nanoinfer", "--scenarios", "mla", "--repeats", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    result = json.loads((tmp_path / "latest.json").read_text())["engines"]["nanoinfer"]["mla"]
    assert result["cache_bytes_per_token_layer"] == {"mla": 576 * 2, "mha": 2 * 16 * 192 * 2}
    assert result["mha_over_mla"] == result["step_ms"]["mha"] / result["step_ms"]["mla"] > 0
    assert "| MLA (latent 512 + rope 64) | 1152 |" in capsys.readouterr().out


def test_http_scenario_and_the_bandwidth_bound(tiny_model, tmp_path, capsys, monkeypatch):
    """The http scenario on a tiny model: `nanoinfer serve` through the HTTP client at two
    concurrencies with its startup time; a peer that is not installed is reported with why,
    never dropped. tg128 comes with the bandwidth bound."""
    monkeypatch.setenv("LLAMA_SERVER", str(tmp_path / "no-such-llama-server"))
    monkeypatch.setattr("nanoinfer.bench.http_serving.VLLM_VENV", tmp_path / "no-venv")
    directory, _ = tiny_model("llama")
    args = ["--model", str(directory), "--engines", "nanoinfer", "--scenarios", "tg128,http", "--repeats", "1"]
    args += ["--out", str(tmp_path), "--num-requests", "4", "--concurrency", "1,2"]
    args += ["--input-len", "8,16", "--output-len", "4,8"]
    assert main(args) == 0
    engine = json.loads((tmp_path / "latest.json").read_text())["engines"]["nanoinfer"]
    ours = engine["http"]["nanoinfer"]
    assert ours["error"] is None and ours["startup_s"] > 0
    for c in ("1", "2"):
        figures = ours["concurrency"][c]
        assert figures["output_tok_s"] > 0 and 0 < figures["ttft_p50"] <= figures["ttft_p99"]
    assert "vLLM is not installed" in engine["http"]["vllm"]["error"]
    assert engine["http"]["vllm"]["dtype"] == http_serving.vllm_dtype(cpu_flags())  # reported as it would run
    assert engine["http"]["llama-server"]["error"] == "llama-server needs a GGUF model"  # the tiny model is HF
    bound = engine["bandwidth"]
    model = NanoinferPeer(str(directory)).engine.model  # the bench's engine, built again
    # bytes read per decoded token: every weight but the embedding table, which is only looked up
    assert bound["weight_bytes"] == weight_bytes(model) - model.embed.weight.nbytes > 0
    assert bound["read_gb_s"] > 0 and bound["fraction_of_bound"] > 0
    assert "vLLM is not installed" in ours["vllm_bench_serve"]["2"]["error"]  # its client, reported too
    table = capsys.readouterr().out
    assert "| nanoinfer |" in table and f"| vllm ({engine['http']['vllm']['dtype']}) |" in table
    assert "not run: vLLM is not installed" in table
    assert "| ttft_p50 | 1 | ≥ 1× / ≥ 1× | not run | not run | no |" in table  # a target without peers never holds
    assert "| batch-1 decode / bandwidth bound | 1 | ≥ 80% |" in table


def test_http_targets_hold_only_on_the_ratios_measured():
    """Each target row compares the figures of the run: throughput as ours over theirs, latency
    as theirs over ours, holding only when every peer's ratio reaches the target."""
    from nanoinfer.bench.http_serving import target_lines

    def figures(tok_s: float, ttft: float, tpot: float) -> dict:
        return {"output_tok_s": tok_s, "ttft_p50": ttft, "tpot_p99": tpot}

    result = {
        "nanoinfer": {"concurrency": {"16": figures(150, 0.5, 0.12)}},
        "llama-server": {"concurrency": {"16": figures(40, 2.0, 0.5)}},
        "vllm": {"concurrency": {"16": figures(60, 0.4, 0.6)}},
    }
    rows = {tuple(line.split(" | ")[:2]): line for line in target_lines(result, {"fraction_of_bound": 0.5})}
    assert rows[("| output_tok_s", "16")].endswith("| 3.75× | 2.50× | no |")  # 150 / 60 < 3
    assert rows[("| ttft_p50", "16")].endswith("| 4.00× | 0.80× | no |")  # vLLM's 0.4 s beats our 0.5 s
    assert rows[("| tpot_p99", "16")].endswith("| 4.17× | 5.00× | yes |")
    assert rows[("| ttft_p50", "64")].endswith("| not run | not run | no |")
    assert rows[("| batch-1 decode / bandwidth bound", "1")].endswith("| 50% | | no |")


def test_moe_scenario(tmp_path, capsys, monkeypatch):
    """The moe scenario end to end, shrunk: MoE against the dense model of its active size, both
    through our engine in float32 and int4, and transformers at batch 16, with the ratios table."""
    import nanoinfer.bench.moe as moe

    small = dict(moe.SIZES, vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    monkeypatch.setattr(moe, "SIZES", dict(small, num_key_value_heads=2, head_dim=16))
    monkeypatch.setattr(moe, "EXPERTS", 4)
    monkeypatch.setattr(moe, "ACTIVE", 2)
    monkeypatch.setattr(moe, "EXPERT_WIDTH", 32)
    monkeypatch.setattr(moe, "NEW_TOKENS", 8)
    args = ["--engines", "nanoinfer", "--scenarios", "moe", "--repeats", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    result = json.loads((tmp_path / "latest.json").read_text())["engines"]["nanoinfer"]["moe"]
    figures = result["decode_tok_s"]
    assert set(figures) == {"moe none", "dense none", "moe int4", "dense int4", "moe transformers"}
    assert all(v > 0 for by_batch in figures.values() for v in by_batch.values())
    assert result["ratios"]["moe/dense int4 batch 1"] == figures["moe int4"]["1"] / figures["dense int4"]["1"]
    assert "| moe/dense none batch 16 |" in capsys.readouterr().out


def test_vllm_runs_bfloat16_only_where_the_cpu_computes_in_it(tmp_path):
    """The issue's rule: float32 where the CPU has no native bf16 (emulated bf16 is far slower)."""
    assert http_serving.vllm_dtype(frozenset({"avx2", "avx512f", "avx512_bf16"})) == "bfloat16"
    assert http_serving.vllm_dtype(frozenset({"avx2", "amx_bf16"})) == "bfloat16"
    assert http_serving.vllm_dtype(frozenset({"avx2", "avx512f", "avx512_vnni"})) == "float32"
    argv = http_serving.vllm_server(tmp_path, 2, 16, "float32").argv
    assert argv[argv.index("--dtype") + 1] == "float32"
