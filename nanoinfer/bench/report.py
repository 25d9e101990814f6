"""Turn a benchmark result dict into latest.json, latest.md (table with ratios) and latest.png (bars)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PEERS = ("llama.cpp", "transformers")


def figures(result: dict[str, Any]) -> dict[str, tuple[float, bool]]:
    """Flat {label: (value, higher_is_better)} for one engine."""
    out: dict[str, tuple[float, bool]] = {}
    if "pp512" in result:
        out["pp512 (tok/s)"] = (result["pp512"]["tok_s"], True)
    if "tg128" in result:
        out["tg128 (tok/s)"] = (result["tg128"]["tok_s"], True)
    for c, f in result.get("serving", {}).items():
        out[f"serving c={c}: output tok/s"] = (f["output_tok_s"], True)
        out[f"serving c={c}: TTFT p50 (ms)"] = (f["ttft_p50"] * 1000, False)
        out[f"serving c={c}: TTFT p99 (ms)"] = (f["ttft_p99"] * 1000, False)
        out[f"serving c={c}: TPOT p50 (ms)"] = (f["tpot_p50"] * 1000, False)
        out[f"serving c={c}: TPOT p99 (ms)"] = (f["tpot_p99"] * 1000, False)
    if "shared_prefix" in result:
        sp = result["shared_prefix"]
        out["shared prefix: mean TTFT, cache off (ms)"] = (sp["cache_off"]["mean_ttft_s"] * 1000, False)
        out["shared prefix: mean TTFT, cache on (ms)"] = (sp["cache_on"]["mean_ttft_s"] * 1000, False)
    return out


def markdown(results: dict[str, Any]) -> str:
    engines = results["engines"]
    ours = figures(engines["nanoinfer"])
    peers = [p for p in PEERS if p in engines]
    theirs = {p: figures(engines[p]) for p in peers}
    m = results["machine"]
    lines = [
        f"# nanoinfer vs peers: {results['model']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads; torch {m['torch']}. "
        f"nanoinfer: {engines['nanoinfer']['info']}. " + " ".join(f"{p}: {engines[p]['info']}." for p in peers),
    ]
    if ours:  # none when only the spec scenario ran
        lines += [
            "",
            "Ratios are nanoinfer's advantage (>1 means nanoinfer is better: faster or lower latency). Each "
            "figure is the median of its runs after a warm-up; the engines ran in turn within each round.",
            "",
            "| " + " | ".join(["figure", "nanoinfer", *peers, *(f"vs {p}" for p in peers)]) + " |",
            "|---|---:|" + "---:|" * (2 * len(peers)),
        ]
    for label, (value, higher) in ours.items():
        cells = [f"{theirs[p][label][0]:.1f}" if label in theirs[p] else "–" for p in peers]
        ratios = []
        for p in peers:
            if label in theirs[p] and theirs[p][label][0] > 0 and value > 0:
                other = theirs[p][label][0]
                ratios.append(f"{(value / other if higher else other / value):.2f}×")
            else:
                ratios.append("–")
        lines.append("| " + " | ".join([label, f"{value:.1f}", *cells, *ratios]) + " |")
    if "shared_prefix" in engines["nanoinfer"]:
        lines += [
            "",
            f"Prefix cache TTFT speed-up on the shared-prefix workload: "
            f"{engines['nanoinfer']['shared_prefix']['speedup']:.1f}×",
        ]
    if any("spec" in e for e in engines.values()):
        lines += ["", *spec_markdown(engines)]
    if "structured" in engines.get("nanoinfer", {}):
        from nanoinfer.bench.structured import structured_markdown

        lines += ["", *structured_markdown(engines["nanoinfer"]["structured"])]
    if "mla" in engines.get("nanoinfer", {}):
        from nanoinfer.bench.mla import mla_markdown

        lines += ["", *mla_markdown(engines["nanoinfer"]["mla"])]
    if "moe" in engines.get("nanoinfer", {}):
        from nanoinfer.bench.moe import moe_markdown

        lines += ["", *moe_markdown(engines["nanoinfer"]["moe"])]
    if "http" in engines.get("nanoinfer", {}):
        from nanoinfer.bench.http_serving import http_markdown

        lines += ["", *http_markdown(engines["nanoinfer"]["http"], engines["nanoinfer"].get("bandwidth"))]
    if "bandwidth" in engines.get("nanoinfer", {}):
        b = engines["nanoinfer"]["bandwidth"]
        lines += [
            "",
            f"Batch-1 decode against the memory-bandwidth bound: {b['read_gb_s']:.1f} GB/s read, "
            f"{b['weight_bytes'] / 2**20:.1f} MiB of weights read per token (the embedding table is only "
            "looked up): tg128 is "
            f"{100 * b['fraction_of_bound']:.0f}% of the {b['bound_tok_s']:.0f} tok/s bound.",
        ]
    if "tp" in engines.get("nanoinfer", {}):
        from nanoinfer.bench.parallel import parallel_markdown

        lines += ["", *parallel_markdown(engines["nanoinfer"]["tp"])]
    if "dp" in engines.get("nanoinfer", {}):
        from nanoinfer.bench.data_parallel import data_parallel_markdown

        lines += ["", *data_parallel_markdown(engines["nanoinfer"]["dp"])]
    if "lora" in engines.get("nanoinfer", {}):
        from nanoinfer.bench.lora import lora_markdown

        lines += ["", *lora_markdown(engines["nanoinfer"]["lora"])]
    return "\n".join(lines) + "\n"


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def spec_markdown(engines: dict[str, Any]) -> list[str]:
    """The spec scenario's tables: batch-1 decode per engine, setting and workload, then serving."""
    lines = [
        "## Speculative decoding",
        "",
        "Batch 1, greedy chat answers: decode tok/s after the first token (median of the runs after a "
        "warm-up; nanoinfer's settings ran in lockstep, one engine step each in turn, each timed by its "
        "own steps; another engine's settings ran in turn within each round); vs baseline: the "
        "median over rounds of each round's ratio to the same engine without speculation; acceptance is "
        "accepted / proposed draft tokens; tokens/forward counts decode tokens per target forward pass; "
        "identical: every answer equals "
        "the baseline's.",
        "",
        f"nanoinfer here: {engines['nanoinfer'].get('spec', {}).get('info', {})}, one engine per setting.",
        "",
        "| engine | setting | workload | decode tok/s | vs baseline | acceptance | tokens/forward | identical |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for engine, result in engines.items():
        for setting, workloads in result.get("spec", {}).get("batch1", {}).items():
            for workload, r in workloads.items():
                lines.append(
                    f"| {engine} | {setting} | {workload} | {r['tok_s']:.1f} | {_cell(r['ratio'], '.2f')}× | "
                    f"{_cell(r['acceptance'], '.2f')} | {_cell(r['tokens_per_forward'], '.2f')} | "
                    f"{'yes' if r['identical'] else 'NO'} |"
                )
    for c, settings in engines["nanoinfer"].get("spec", {}).get("serving", {}).items():
        lines += [
            "",
            f"nanoinfer serving, concurrency {c}, each answer as long as the baseline's greedy one, "
            "the settings in lockstep:",
            "",
            "| setting | workload | output tok/s | vs baseline |",
            "|---|---|---:|---:|",
        ]
        for setting, workloads in settings.items():
            for workload, r in workloads.items():
                lines.append(f"| {setting} | {workload} | {r['output_tok_s']:.1f} | {_cell(r['ratio'], '.3f')}× |")
    return lines


def chart(results: dict[str, Any], path: Path) -> bool:
    """Throughput bars per scenario and engine; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = {engine: figures(result) for engine, result in results["engines"].items()}
    http = results["engines"]["nanoinfer"].get("http", {})
    servers = {name: r["concurrency"] for name, r in http.items() if r.get("concurrency")}
    labels = [label for label, (_, higher) in panels["nanoinfer"].items() if higher]
    if not labels and not servers:
        return False
    plots = [(panels, labels, "in process")] if labels else []
    if servers:
        over_http = {
            name: {f"c={c}": (f["output_tok_s"], True) for c, f in by_c.items()} for name, by_c in servers.items()
        }
        plots.append((over_http, list(next(iter(over_http.values()))), "serving over HTTP, output"))
    width_in = max(8, 1.6 * sum(len(p[1]) for p in plots))
    fig, axes = plt.subplots(1, len(plots), figsize=(width_in, 4.5), squeeze=False)
    for ax, (by_engine, keys, title) in zip(axes[0], plots):
        _bars(ax, by_engine, keys)
        ax.set_title(title)
    axes[0][0].set_ylabel("tokens / s (higher is better)")
    fig.suptitle(f"{results['model']} on {results['machine']['cores']} CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _bars(ax: Any, by_engine: dict[str, dict[str, tuple[float, bool]]], labels: list[str]) -> None:
    """Grouped bars: one group per label, one bar per engine."""
    width = 0.8 / len(by_engine)
    for i, (engine, f) in enumerate(by_engine.items()):
        values = [f[label][0] if label in f else 0 for label in labels]
        bars = ax.bar([x + i * width for x in range(len(labels))], values, width, label=engine)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([x + width * (len(by_engine) - 1) / 2 for x in range(len(labels))])
    ax.set_xticklabels([label.replace(": output tok/s", "").replace(" (tok/s)", "") for label in labels])
    ax.legend()


def write_reports(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "latest.json", "md": out_dir / "latest.md"}
    paths["json"].write_text(json.dumps(results, indent=2))
    paths["md"].write_text(markdown(results))
    if chart(results, out_dir / "latest.png"):
        paths["png"] = out_dir / "latest.png"
    return paths
