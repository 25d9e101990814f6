"""`nanoinfer` command line: run, chat, inspect, serve."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from nanoinfer.errors import NanoInferError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from nanoinfer.loading.registry import BUILTIN_MODELS, DEFAULT_MODEL

    p.add_argument(
        "--model",
        "-m",
        default=DEFAULT_MODEL,
        help=f"built-in name ({', '.join(BUILTIN_MODELS)}), HF model directory or .gguf file "
        f"(default: {DEFAULT_MODEL})",
    )
    from nanoinfer.config import DTYPE_CHOICES

    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="float weight dtype; activations too, except on CPU where they stay float32. auto: float32 "
        "weights over a float16 KV cache on CPU; float32: the KV cache in float32 too (default: auto)",
    )
    p.add_argument(
        "--quantization",
        "-q",
        default=None,
        choices=["none", "int8", "int4"],
        help="weight-only quantization (default: the model's; int4 for the built-in GGUF models)",
    )


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    from nanoinfer.config import KV_CACHE_DTYPES, EngineConfig

    p.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together per step")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    p.add_argument("--block-size", type=int, default=EngineConfig.block_size, help="tokens per KV block")
    p.add_argument(
        "--kv-cache-memory",
        default=None,
        help="KV pool size, e.g. 2GiB (default: enough for "
        "max-model-len x max-num-seqs; at most 2GiB when --max-model-len is not given)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="KV cache storage (default auto: float16 on CPU, where it halves decode attention's "
        "memory traffic; else the activations' dtype)",
    )
    p.add_argument("--no-prefix-cache", action="store_true", help="turn the radix prefix cache off")
    p.add_argument(
        "--speculative-config",
        default=None,
        metavar="JSON",
        help='speculative decoding, as vLLM spells it: \'{"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_max": 4, "prompt_lookup_min": 2}\' or \'{"method": "draft_model", "model": "NAME", '
        '"quantization": "int4", "num_speculative_tokens": 4}\' (default: off)',
    )
    p.add_argument(
        "--enable-lora", action="store_true", help="serve LoRA adapters (PEFT format) next to the base model"
    )
    p.add_argument(
        "--max-loras", type=int, default=EngineConfig.max_loras, help="adapters resident (and in a batch) at once"
    )
    p.add_argument(
        "--max-lora-rank", type=int, default=EngineConfig.max_lora_rank, help="largest adapter rank accepted"
    )
    p.add_argument(
        "--merge-lora", default=None, metavar="DIR", help="fold this PEFT LoRA adapter into the weights at load"
    )
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=EngineConfig.tensor_parallel_size,
        help="split the model over this many ranks (worker processes here, or the ranks torchrun started)",
    )
    p.add_argument(
        "--pipeline-parallel-size",
        "-pp",
        type=int,
        default=EngineConfig.pipeline_parallel_size,
        help="split the layers into this many stages, one rank each",
    )
    p.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        default=EngineConfig.data_parallel_size,
        help="run this many engine replicas, requests routed to the one with the longest cached prefix",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from nanoinfer.config import parse_memory

    kwargs: dict[str, Any] = {}
    for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_dtype"):
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    if getattr(args, "kv_cache_memory", None):
        kwargs["kv_cache_memory"] = parse_memory(args.kv_cache_memory)
    if getattr(args, "no_prefix_cache", False):
        kwargs["enable_prefix_cache"] = False
    if getattr(args, "speculative_config", None):
        kwargs["speculative_config"] = args.speculative_config
    if getattr(args, "enable_lora", False) or getattr(args, "lora_modules", None):
        kwargs.update(enable_lora=True, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank)
    if getattr(args, "merge_lora", None):
        kwargs["merge_lora"] = args.merge_lora
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        if getattr(args, name, None):
            kwargs[name] = getattr(args, name)
    return kwargs


def _load_llm(args: argparse.Namespace):
    from nanoinfer.llm import LLM

    return LLM(args.model, dtype=args.dtype, quantization=args.quantization, **_engine_kwargs(args))


def _sampling(llm, args: argparse.Namespace):
    return llm.default_params(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )


def _stream_to_stdout(llm, prompt_ids: list[int], params) -> tuple[str, dict[str, float]]:
    """Print the answer as it is generated; return its text and timing stats."""
    start = time.perf_counter()
    first = None
    text, n_tokens, steps = "", 0, 0
    for out in llm.stream(prompt_ids, params):
        steps += 1  # one output per forward pass that produced tokens
        if first is None:
            first = time.perf_counter()
        piece = out.outputs[0].delta_text
        text += piece
        n_tokens = len(out.outputs[0].token_ids)
        sys.stdout.write(piece)
        sys.stdout.flush()
    end = time.perf_counter()
    first = first or end
    decode_tokens = max(n_tokens - 1, 0)
    return text, {
        "prompt_tokens": len(prompt_ids),
        "ttft": first - start,
        "output_tokens": n_tokens,
        "decode_tps": decode_tokens / (end - first) if end > first else 0.0,
        "tokens_per_forward": decode_tokens / max(steps - 1, 1),
    }


def cmd_run(args: argparse.Namespace) -> int:
    llm = _load_llm(args)
    if args.raw or not llm.tokenizer.chat_template:
        ids = llm.tokenizer.encode(args.prompt)
    else:
        ids = llm.chat_prompt([{"role": "user", "content": args.prompt}])
    _, stats = _stream_to_stdout(llm, ids, _sampling(llm, args))
    sys.stdout.write("\n")
    if args.verbose:
        # One step prefills the whole prompt, so prefill time is the time to the first token.
        print(
            f"[stats] prompt tokens: {stats['prompt_tokens']}, prefill: {stats['ttft'] * 1000:.0f} ms "
            f"({stats['prompt_tokens'] / max(stats['ttft'], 1e-9):.0f} tok/s), "
            f"time to first token: {stats['ttft'] * 1000:.0f} ms, output tokens: {stats['output_tokens']}, "
            f"decode: {stats['decode_tps']:.1f} tok/s",
            file=sys.stderr,
        )
        if llm.engine.proposer is not None:

            def metric(name: str) -> float:  # summed over data-parallel replicas
                return sum(e.metrics.registry.get_sample_value(name) or 0.0 for e in llm.engines)

            drafted = metric("nanoinfer:spec_decode_num_draft_tokens_total")
            accepted = metric("nanoinfer:spec_decode_num_accepted_tokens_total")
            print(
                f"[spec] draft tokens: {drafted:.0f}, accepted: {accepted:.0f} "
                f"({100 * accepted / max(drafted, 1):.1f}%), mean tokens per target forward: "
                f"{stats['tokens_per_forward']:.2f}",
                file=sys.stderr,
            )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _load_llm(args)
    if not llm.tokenizer.chat_template:
        raise NanoInferError(f"{args.model} has no chat template; use `nanoinfer run --raw` instead")
    interactive = sys.stdin.isatty()
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    if interactive:
        print("nanoinfer chat: /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        text, _ = _stream_to_stdout(llm, llm.chat_prompt(history), _sampling(llm, args))
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": text})
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import dataclasses

    from nanoinfer.loading import load_package
    from nanoinfer.model.transformer import Transformer

    package = load_package(args.model)
    model = Transformer.from_package(package)
    print(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\nparameters: {n_params:,} ({n_params / 1e6:.1f} M)")
    print(f"source: {package.source} ({package.file_type})\n\nconfig:")
    for field in dataclasses.fields(package.config):
        print(f"  {field.name}: {getattr(package.config, field.name)}")
    g = package.generation
    sampling = {
        "temperature": g.temperature,
        "top_p": g.top_p,
        "top_k": g.top_k,
        "repetition_penalty": g.repetition_penalty,
    }
    shown = (
        ", ".join(f"{k} {v}" for k, v in sampling.items() if v is not None)
        or "none (SamplingParams' own: temperature 1.0)"
    )
    print(f"\nsampling defaults (used when a request does not set them): {shown}")
    _print_kv_formula(package.config)
    if args.tokens is not None:
        ids = package.tokenizer.encode(args.tokens)
        print(f"\ntokens ({len(ids)}):")
        for i in ids:
            print(f"  {i:>7}  {package.tokenizer.id_to_token(i)!r}")
        if package.config.num_experts:
            _print_expert_load(model, ids)
    return 0


def _print_kv_formula(config: Any) -> None:
    """The seeds' KV memory formula with this model's numbers: what one token costs the cache."""
    import torch

    from nanoinfer.model.kv_cache import kv_bytes_per_token

    c = config
    if c.is_mla:
        terms = f"{c.num_layers} layers x ({c.kv_lora_rank} kv_lora_rank + {c.qk_rope_head_dim} qk_rope_head_dim)"
        print(f"\nKV cache per token = {terms} x bytes (MLA: one latent row per token and layer):")
    else:
        terms = f"{c.num_layers} layers x {c.num_kv_heads} KV heads x {c.head_dim} head_dim"
        print(f"\nKV cache per token = 2 (K and V) x {terms} x bytes:")
    for dtype in (torch.float16, torch.float32):
        size = kv_bytes_per_token(c, dtype)
        print(f"  {str(dtype).removeprefix('torch.')}: {size:,} bytes ({size * 4096 / 2**20:,.1f} MiB per 4096 tokens)")
    if c.is_mla:
        mha = c.num_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
        print(
            f"  full multi-head K and V would be {c.num_heads} heads x ({c.qk_nope_head_dim + c.qk_rope_head_dim} + "
            f"{c.v_head_dim}) = {mha} values per layer against {c.kv_values_per_token}: "
            f"{mha / c.kv_values_per_token:.1f}x more"
        )


def _print_expert_load(model: Any, ids: list[int]) -> None:
    """Run the prompt once and show how many of its tokens each expert of each MoE layer took."""
    from nanoinfer.engine.metrics import expert_load

    model.score(ids)
    k = model.config.num_experts_per_tok
    print(f"\nexpert load (tokens per expert; each token picks {k} of {model.config.num_experts}):")
    for layer, counts in expert_load(model).items():
        print(f"  layer {layer:>3}: " + " ".join(f"{n:>3}" for n in counts))


def _limit_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """RequestLimits fields given on the command line."""
    import dataclasses

    from nanoinfer.config import RequestLimits

    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(RequestLimits)}
    return {name: value for name, value in given.items() if value is not None}


def cmd_serve(args: argparse.Namespace) -> int:
    from nanoinfer.config import EngineConfig, RequestLimits
    from nanoinfer.server.app import ServerConfig, serve

    config = ServerConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_request_bytes=args.max_request_bytes,
        max_waiting_requests=args.max_waiting_requests,
        request_timeout=args.request_timeout,
        shutdown_timeout=args.shutdown_timeout,
        prefix_cache_isolation=args.prefix_cache_isolation,
        chat_template=_chat_template_arg(args.chat_template),
        lora_modules=tuple(_lora_module(m) for m in args.lora_modules or ()),
        tool_call_parser=args.tool_call_parser,
    )
    engine = EngineConfig(
        dtype=args.dtype,
        quantization=args.quantization,
        limits=RequestLimits(**_limit_kwargs(args)),
        **_engine_kwargs(args),
    )
    serve(config, engine)
    return 0


def _lora_module(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise NanoInferError(f"--lora-modules takes name=path, got {value!r}")
    return name, path


def _chat_template_arg(value: str | None) -> str | None:
    """--chat-template: a file's contents, or the template itself; checked that it compiles."""
    from pathlib import Path

    from nanoinfer.chat_template import ChatTemplate

    if value is None:
        return None
    path = Path(value)
    source = path.read_text(encoding="utf-8") if ("{" not in value and path.is_file()) else value
    if "{" not in source:
        raise NanoInferError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    try:
        ChatTemplate(source)
    except ValueError as e:
        raise NanoInferError(f"--chat-template: {e}") from None
    return source


def _add_server_args(p: argparse.ArgumentParser) -> None:
    import dataclasses

    from nanoinfer.config import RequestLimits
    from nanoinfer.server.state import PREFIX_CACHE_ISOLATION, ServerConfig
    from nanoinfer.server.tool_parsers import TOOL_CALL_PARSERS

    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    p.add_argument("--served-model-name", default=None, help="model name clients use (default: --model)")
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=ServerConfig.max_request_bytes,
        help="larger request bodies get 413 (default: %(default)s)",
    )
    p.add_argument(
        "--max-waiting-requests",
        type=int,
        default=None,
        help="sequences that may wait beyond the running batch before requests get 503 with "
        "Retry-After (default: 4 x --max-num-seqs)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="seconds after which a request is aborted (default: none; a request's own `timeout` may shorten it)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=ServerConfig.shutdown_timeout,
        help="on SIGTERM, seconds running requests may finish before they are aborted (default: %(default)s)",
    )
    p.add_argument(
        "--prefix-cache-isolation",
        default="shared",
        choices=PREFIX_CACHE_ISOLATION,
        help="shared: all requests reuse each other's cached prefixes (fastest, but timing and "
        "usage.cached_tokens can reveal what others sent); salt: only requests with the same "
        "cache_salt share, and one without a salt shares with nobody (default: shared)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="a Jinja chat template (a file, or the template itself) used instead of the model's own",
    )
    p.add_argument(
        "--lora-modules", nargs="+", default=None, metavar="NAME=PATH", help="LoRA adapters clients name in `model`"
    )
    p.add_argument(
        "--tool-call-parser",
        default=None,
        choices=sorted(TOOL_CALL_PARSERS),
        help="the format the model writes tool calls in (default: read from the chat template)",
    )
    for f in dataclasses.fields(RequestLimits):
        p.add_argument(
            f"--{f.name.replace('_', '-')}", type=int, default=None, help=f"request limit (default: {f.default})"
        )


def cmd_finetune(args: argparse.Namespace) -> int:
    import dataclasses

    from nanoinfer.train import FinetuneConfig, finetune

    # Every option is named after its FinetuneConfig field, except these two.
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig) if hasattr(args, f.name)}
    values["lora_target"] = tuple(t.strip() for t in args.lora_target.split(",") if t.strip())
    values["progress"] = not args.quiet
    config = FinetuneConfig(**values)
    result = finetune(config)
    evals = ", ".join(f"{loss:.4f}" for loss in result.eval_losses)
    print(f"{result.steps} steps; eval loss by epoch: {evals or 'n/a'}; written to {result.output}")
    return 0


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    from nanoinfer.loading.registry import DEFAULT_MODEL
    from nanoinfer.model.lora import TARGETS
    from nanoinfer.train import FinetuneConfig as F

    p.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, HF model directory or .gguf file")
    p.add_argument("--data", required=True, help="train.txt (lines) or train.jsonl (messages or prompt/completion)")
    p.add_argument("--eval-data", default=None, help="held-out examples, same formats; loss after every epoch")
    p.add_argument("--output", required=True, help="directory for the adapter or model, checkpoints and logs")
    p.add_argument("--method", choices=("lora", "full"), default=F.method)
    p.add_argument("--lora-r", type=int, default=F.lora_r)
    p.add_argument("--lora-alpha", type=float, default=F.lora_alpha)
    p.add_argument("--lora-dropout", type=float, default=F.lora_dropout)
    p.add_argument("--lora-target", default=",".join(F.lora_target), help=f"comma-separated, from {', '.join(TARGETS)}")
    p.add_argument("--epochs", type=int, default=F.epochs)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-4 LoRA, 2e-5 full)")
    p.add_argument("--batch-size", type=int, default=F.batch_size)
    p.add_argument("--grad-accum", type=int, default=F.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--block-size", type=int, default=F.block_size, help="tokens per block of plain-text data")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--warmup-ratio", type=float, default=F.warmup_ratio)
    p.add_argument("--weight-decay", type=float, default=F.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=F.max_grad_norm)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=F.dtype, help="bfloat16: autocast, fp32 master")
    p.add_argument("--seed", type=int, default=F.seed)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_bench(args: argparse.Namespace) -> int:
    from nanoinfer.bench.compare import main as bench_main

    rest = args.bench_args
    return bench_main(rest[1:] if rest[:1] == ["--"] else rest)


def _add_memory_parser(sub: Any) -> None:
    """`nanoinfer memory`: the memory planner (nanoinfer/memory/), from metadata only."""
    from nanoinfer.config import DTYPE_CHOICES, KV_CACHE_DTYPES, EngineConfig
    from nanoinfer.loading.registry import BUILTIN_MODELS, DEFAULT_MODEL

    p = sub.add_parser(
        "memory",
        help="weights, KV cache and activations per rank, from a config.json or GGUF header (no weights loaded)",
    )
    p.add_argument(
        "--model",
        "-m",
        default=DEFAULT_MODEL,
        help=f"built-in name ({', '.join(BUILTIN_MODELS)}), model directory, config.json or .gguf file "
        f"(default: {DEFAULT_MODEL})",
    )
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="as for run (default: auto)")
    p.add_argument("--quantization", "-q", default=None, choices=["none", "int8", "int4"], help="default: the model's")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help="as for run (default: auto)")
    p.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs, help="sequences per step")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens, help="tokens per step"
    )
    p.add_argument("--block-size", type=int, default=EngineConfig.block_size, help="tokens per KV block")
    p.add_argument("--kv-cache-memory", default=None, help="KV pool size as for run, e.g. 2GiB")
    p.add_argument("--device", default=EngineConfig.device, help="cpu or cuda (default: cpu)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="ranks each layer is split over")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, help="stages the layers are split into")
    p.add_argument(
        "--memory", default=None, help="memory per rank, e.g. 16GiB: also print the largest batch and context that fit"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_memory)


def cmd_memory(args: argparse.Namespace) -> int:
    import json

    from nanoinfer.config import EngineConfig, parse_memory
    from nanoinfer.memory import format_plan, plan_memory, read_metadata

    engine = EngineConfig(
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_memory=parse_memory(args.kv_cache_memory) if args.kv_cache_memory else None,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization,
        device=args.device,
    )
    memory = parse_memory(args.memory) if args.memory else None
    plan = plan_memory(
        read_metadata(args.model), engine, args.tensor_parallel_size, args.pipeline_parallel_size, memory
    )
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoinfer", description="A from-scratch LLM inference engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer one prompt, streamed to stdout")
    _add_model_args(run)
    _add_engine_args(run)
    _add_sampling_args(run)
    run.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    run.add_argument("-v", "--verbose", action="store_true", help="print prefill/decode statistics to stderr")
    run.add_argument("prompt")
    run.set_defaults(func=cmd_run)

    chat = sub.add_parser("chat", help="multi-turn chat in the terminal (stdin may be piped)")
    _add_model_args(chat)
    _add_engine_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(func=cmd_chat)

    inspect = sub.add_parser("inspect", help="module tree, parameter count, config, tokens")
    _add_model_args(inspect)
    inspect.add_argument(
        "--tokens",
        default=None,
        metavar="TEXT",
        help="show the tokens of TEXT (and, for a mixture-of-experts model, how many of them each expert takes)",
    )
    inspect.set_defaults(func=cmd_inspect)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_model_args(serve)
    _add_engine_args(serve)
    _add_server_args(serve)
    serve.set_defaults(func=cmd_serve)

    finetune = sub.add_parser("finetune", help="fine-tune a model, fully or with LoRA (PEFT format)")
    _add_finetune_args(finetune)
    finetune.set_defaults(func=cmd_finetune)

    bench = sub.add_parser(
        "bench",
        help="nanoinfer vs transformers vs llama-cpp-python, side by side "
        "(all options of `python -m nanoinfer.bench.compare --help`)",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    _add_memory_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark's own parser
        argv = ["bench", "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (NanoInferError, ValueError) as e:
        print(f"nanoinfer: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
