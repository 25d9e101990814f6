#!/usr/bin/env python
"""Grammar-engine benchmark for nanoinfer: llguidance vs xgrammar on our two vocabularies.

Reproduce (from the repository root, with llguidance==1.9.1, xgrammar==0.2.9 (+apache-tvm-ffi;
xgrammar is not a dependency of nanoinfer: pip install --no-deps xgrammar apache-tvm-ffi),
jsonschema installed in .venv):

    .venv/bin/python benchmarks/grammar_engines.py          # full run, writes /tmp/grammar_bench.{json,md}
    .venv/bin/python benchmarks/grammar_engines.py --quick  # smoke run (fewer reps)

What is measured (all on CPU, torch.set_num_threads(2), 2 worker threads for every library pool):
  * tokenizer-info setup time (one-off per engine start)
  * compile time per grammar: cold (never seen before) and cached (second request, same schema)
    and time-to-first-mask (compile + matcher + first mask)
  * per-token mask fill time while replaying valid outputs (random walks over the allowed set,
    fixed seeds), batch 1 and batch 16 (16 matchers one after another, and the library's
    batched/threaded API)
  * time to apply a [16, vocab] int32 bitmask to float32 logits
  * correctness: 20 seeded random walks of the nested schema, decoded with nanoinfer's
    tokenizer and validated with jsonschema; JSON-schema keyword support (pos/neg instances)
  * rollback behaviour
Machine-load guard: each section records CPU used by *other* processes (from /proc/stat minus our
own process CPU time) and the 1-min load average; a section with > 0.5 foreign cores busy is
re-run (up to 2 times) and the retries are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import traceback
import warnings

import tempfile

# llguidance.torch.apply_token_bitmask_inplace is torch.compile'd: measure its first call on an
# empty inductor cache (what a fresh deployment pays), not on a cache left by an earlier run.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="grammar_bench_inductor_"))

import numpy as np
import torch

torch.set_num_threads(2)
THREADS = 2

import jsonschema  # noqa: E402
import llguidance  # noqa: E402
import llguidance.hf  # noqa: E402
import llguidance.numpy as llgnp  # noqa: E402
import llguidance.torch as llgt  # noqa: E402
import transformers  # noqa: E402
import xgrammar as xgr  # noqa: E402

from nanoinfer.loading import load_package  # noqa: E402

MODELS = ["smollm2-135m-instruct", "gemma3-270m"]

# ----------------------------------------------------------------------------------------------
# grammars
# ----------------------------------------------------------------------------------------------

SMALL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "active"],
    "additionalProperties": False,
}

NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 100000},
        "name": {"type": "string", "maxLength": 40},
        "email": {"type": "string", "pattern": "^[a-z0-9.]{1,20}@[a-z0-9]{1,12}\\.[a-z]{2,4}$"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 30},
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "contact": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"phone": {"type": "string", "pattern": "^\\+?[0-9]{7,12}$"}},
                    "required": ["phone"],
                    "additionalProperties": False,
                },
                {"type": "null"},
            ]
        },
        "history": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "year": {"type": "integer", "minimum": 1990, "maximum": 2030},
                    "ok": {"type": "boolean"},
                },
                "required": ["year", "ok"],
                "additionalProperties": False,
            },
            "minItems": 0,
            "maxItems": 3,
        },
    },
    "required": ["id", "name", "role", "tags", "address", "history"],
    "additionalProperties": False,
}

REGEX = r"\d{3}-\d{4}"
CHOICES = ["red", "green", "blue"]
GBNF = """root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [0-9]+
"""

GRAMMARS = ["small_schema", "nested_schema", "json_object", "regex", "choice", "ebnf"]


def validator(kind: str):
    """A function text -> (ok, why) checking a decoded output against the grammar's meaning."""
    if kind in ("small_schema", "nested_schema"):
        schema = SMALL_SCHEMA if kind == "small_schema" else NESTED_SCHEMA

        def v(text):
            try:
                obj = json.loads(text)
            except Exception as e:  # noqa: BLE001
                return False, f"json: {e}"
            try:
                jsonschema.validate(obj, schema)
            except jsonschema.ValidationError as e:
                return False, f"schema: {e.message}"
            return True, ""

        return v
    if kind == "json_object":
        def v(text):
            try:
                obj = json.loads(text)
            except Exception as e:  # noqa: BLE001
                return False, f"json: {e}"
            return isinstance(obj, dict), "" if isinstance(obj, dict) else "not an object"
        return v
    if kind == "regex":
        def v(text):
            if re.fullmatch(r"[0-9]{3}-[0-9]{4}", text):
                return True, ""
            if re.fullmatch(r"\d{3}-\d{4}", text):
                return False, "non-ASCII digits (only valid if \\d means Unicode Nd)"
            return False, "no match"
        return v
    if kind == "choice":
        return lambda text: (text in CHOICES, "choice")
    if kind == "ebnf":
        rx = re.compile(r"[0-9]+|[-+*/()]")

        def v(text):
            toks = rx.findall(text)
            if "".join(toks) != text:
                return False, "stray chars"
            pos = 0

            def expr():
                nonlocal pos
                term()
                while pos < len(toks) and toks[pos] in "+-":
                    pos += 1
                    term()

            def term():
                nonlocal pos
                factor()
                while pos < len(toks) and toks[pos] in "*/":
                    pos += 1
                    factor()

            def factor():
                nonlocal pos
                if pos < len(toks) and toks[pos].isdigit():
                    pos += 1
                elif pos < len(toks) and toks[pos] == "(":
                    pos += 1
                    expr()
                    if pos >= len(toks) or toks[pos] != ")":
                        raise ValueError("missing )")
                    pos += 1
                else:
                    raise ValueError("bad factor")

            try:
                expr()
            except ValueError as e:
                return False, str(e)
            return pos == len(toks), "trailing"
        return v
    raise KeyError(kind)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def now():
    return time.perf_counter()


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def p90(xs):
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]


def _cpu_busy_seconds():
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class LoadMonitor:
    def __enter__(self):
        self.t0 = now()
        self.busy0 = _cpu_busy_seconds()
        self.own0 = time.process_time()
        self.la0 = os.getloadavg()[0]
        return self

    def __exit__(self, *a):
        wall = now() - self.t0
        busy = _cpu_busy_seconds() - self.busy0
        own = time.process_time() - self.own0
        self.foreign_cores = max(0.0, (busy - own) / max(wall, 1e-9))
        self.la1 = os.getloadavg()[0]
        self.wall = wall
        return False


LOAD_LOG: list[dict] = []


def foreign_now(window=0.5):
    """Cores used by other processes over a short idle window of ours."""
    b0, o0, t0 = _cpu_busy_seconds(), time.process_time(), now()
    time.sleep(window)
    return max(0.0, (_cpu_busy_seconds() - b0 - (time.process_time() - o0)) / (now() - t0))


def guarded(name, fn, max_tries=3, limit=0.5):
    """Wait for a quiet machine, run fn(), and re-run it when other processes used > `limit` cores
    during it (judged only for sections >= 1 s: /proc/stat has 10 ms resolution)."""
    for attempt in range(1, max_tries + 1):
        waited = 0.0
        pre = foreign_now()
        while pre > limit and waited < 120:
            time.sleep(2)
            waited += 2.5
            pre = foreign_now()
        with LoadMonitor() as lm:
            res = fn()
        judged = lm.wall >= 1.0
        rec = {"section": name, "attempt": attempt, "wall_s": round(lm.wall, 2),
               "foreign_cores_before": round(pre, 2), "waited_s": waited,
               "foreign_cores": round(lm.foreign_cores, 2) if judged else None,
               "loadavg_start": round(lm.la0, 2), "loadavg_end": round(lm.la1, 2)}
        LOAD_LOG.append(rec)
        print(f"  [load] {rec}", flush=True)
        if (not judged or lm.foreign_cores <= limit) and pre <= limit:
            return res
        print(f"  [load] foreign CPU load too high: repeating {name}", flush=True)
        time.sleep(5)
    return res


def allowed_ids(bitmask_row: torch.Tensor, vocab: int) -> np.ndarray:
    bits = np.unpackbits(bitmask_row.numpy().view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


# ----------------------------------------------------------------------------------------------
# library adapters
# ----------------------------------------------------------------------------------------------


class LLG:
    name = "llguidance"

    def __init__(self, pkg):
        self.pkg = pkg
        self.V = pkg.config.vocab_size
        self.eos = list(pkg.tokenizer.eos_token_ids)
        self.executor = llguidance.LLExecutor(num_threads=THREADS)

    def setup_variants(self):
        backend = self.pkg.tokenizer.backend
        V, eos = self.V, self.eos

        def direct():
            return llguidance.LLTokenizer(backend.to_str(), n_vocab=V, eos_token=eos)

        def via_hf():
            hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
            return llguidance.hf.from_tokenizer(hf, n_vocab=V, eos_token=eos)

        return {"LLTokenizer(backend.to_str())": direct, "llguidance.hf.from_tokenizer(PreTrainedTokenizerFast)": via_hf}

    def setup(self):
        import llguidance.hf  # noqa: F401
        self.tok = llguidance.LLTokenizer(self.pkg.tokenizer.backend.to_str(), n_vocab=self.V, eos_token=self.eos)

    # grammar text (cheap) -> matcher (the compile happens inside LLMatcher())
    def grammar_text(self, kind):
        if kind == "small_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(SMALL_SCHEMA)
        if kind == "nested_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(NESTED_SCHEMA)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(REGEX)
        if kind == "choice":
            return llguidance.grammar_from("choice", json.dumps(CHOICES))
        if kind == "ebnf":
            return llguidance.grammar_from("grammar", GBNF)  # GBNF -> Lark conversion included
        if kind.startswith("schema:"):
            return llguidance.LLMatcher.grammar_from_json_schema(kind[len("schema:"):])
        raise KeyError(kind)

    def compile_cold(self, kind, compiler=None):
        m = llguidance.LLMatcher(self.tok, self.grammar_text(kind), log_level=0)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m  # the "compiled grammar" is a pristine matcher; requests get deep copies

    def new_compiler(self):
        return None

    def compile_cached(self, compiled):
        return compiled.deep_copy()

    def new_matcher(self, compiled):
        return compiled.deep_copy()

    def warnings(self, compiled):
        return compiled.get_grammar_warnings()

    def fill(self, m, bm, i=0):
        llgt.fill_next_token_bitmask(m, bm, i)

    def fill_batch(self, ms, bm):
        llgt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(ms)], bm)

    def accept(self, m, t):
        return m.consume_token(int(t))

    def accept_batch(self, ms, ts):
        return llgt.consume_token_par(self.executor, list(zip(ms, [int(t) for t in ts])))

    def done(self, m):
        return m.is_stopped()

    def accepting(self, m):
        return m.is_accepting()

    def error(self, m):
        return m.get_error() if m.is_error() else ""

    def rollback(self, m, n):
        return m.rollback(n)

    def lib_decode(self, ids):
        return self.tok.decode_bytes([i for i in ids if i not in self.eos])


def xgr_info_stock(pkg):
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=pkg.tokenizer.backend)
    return xgr.TokenizerInfo.from_huggingface(hf, vocab_size=pkg.config.vocab_size,
                                              stop_token_ids=list(pkg.tokenizer.eos_token_ids))


def xgr_info_blanked(pkg):
    """What nanoinfer should use: no transformers, and special/control tokens (other than the stop
    tokens) given as "" so that xgrammar classifies them as special and never allows them as text
    (from_huggingface leaves e.g. <|im_start|>, <unused0> allowed inside JSON strings)."""
    backend, V = pkg.tokenizer.backend, pkg.config.vocab_size
    eos = list(pkg.tokenizer.eos_token_ids)
    specials = set(pkg.tokenizer.special_ids) - set(eos)
    enc = [""] * V
    for t, i in backend.get_vocab(with_added_tokens=True).items():
        if i < V and i not in specials:
            enc[i] = t
    md = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    return xgr.TokenizerInfo(enc, md["vocab_type"], vocab_size=V, stop_token_ids=eos,
                             add_prefix_space=md["add_prefix_space"])


def special_leak_check(pkg, llg_tok):
    """Allowed non-stop special tokens at a JSON-string-content position ('{"name":"')."""
    V = pkg.config.vocab_size
    specials = sorted(set(pkg.tokenizer.special_ids) - set(pkg.tokenizer.eos_token_ids))
    out = {"n_special_non_eos": len(specials)}
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    bm = xgr.allocate_token_bitmask(1, V)
    prefix_ids = pkg.tokenizer.encode('{"name":"', add_special_tokens=False)

    def count(fill):
        fill()
        bits = np.unpackbits(bm[0].numpy().view(np.uint8), bitorder="little")[:V].astype(bool)
        hit = [i for i in specials if bits[i]]
        return {"allowed": len(hit), "examples": [pkg.tokenizer.id_to_token(i) for i in hit[:4]]}

    m = llguidance.LLMatcher(llg_tok, llguidance.LLMatcher.grammar_from_json_schema(schema), log_level=0)
    assert m.consume_tokens(prefix_ids)
    out["llguidance LLTokenizer"] = count(lambda: llgt.fill_next_token_bitmask(m, bm, 0))
    for label, info in (("xgrammar from_huggingface (stock)", xgr_info_stock(pkg)),
                        ("xgrammar TokenizerInfo, specials blanked", xgr_info_blanked(pkg))):
        cg = xgr.GrammarCompiler(info, max_threads=THREADS).compile_json_schema(schema)
        xm = xgr.GrammarMatcher(cg)
        assert all(xm.accept_token(t) for t in prefix_ids)
        out[label] = count(lambda: xm.fill_next_token_bitmask(bm, 0))
    return out


class XGR:
    name = "xgrammar"

    def __init__(self, pkg, dynamic=False):
        self.strict = True
        self.pkg = pkg
        self.V = pkg.config.vocab_size
        self.eos = list(pkg.tokenizer.eos_token_ids)
        self.dynamic = dynamic
        if dynamic:
            self.name = "xgrammar(dyn)"
        self.batch = xgr.BatchGrammarMatcher(max_threads=THREADS)

    def setup_variants(self):
        backend = self.pkg.tokenizer.backend
        V, eos = self.V, self.eos

        def via_hf():
            hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
            return xgr.TokenizerInfo.from_huggingface(hf, vocab_size=V, stop_token_ids=eos)

        def direct():  # no transformers: vocab + metadata detected from tokenizer.json
            vocab = backend.get_vocab(with_added_tokens=True)
            enc = [""] * V
            for t, i in vocab.items():
                if i < V:
                    enc[i] = t
            md = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
            return xgr.TokenizerInfo(enc, md["vocab_type"], vocab_size=V, stop_token_ids=eos,
                                     add_prefix_space=md["add_prefix_space"])

        return {"TokenizerInfo.from_huggingface(PreTrainedTokenizerFast)": via_hf,
                "TokenizerInfo(vocab, vocab_type) (no transformers)": direct,
                "TokenizerInfo(vocab with specials blanked) (used below)": lambda: xgr_info_blanked(self.pkg)}

    def setup(self):
        self.info = xgr_info_blanked(self.pkg)
        self.compiler = self.new_compiler()

    def new_compiler(self):
        return xgr.GrammarCompiler(self.info, max_threads=THREADS, cache_enabled=True,
                                   enable_dynamic_compilation=self.dynamic)

    def _compile(self, c, kind):
        if kind == "small_schema":
            return c.compile_json_schema(SMALL_SCHEMA)
        if kind == "nested_schema":
            return c.compile_json_schema(NESTED_SCHEMA)
        if kind == "json_object":
            # like vLLM; compile_builtin_json_grammar() would also allow a top-level array
            return c.compile_json_schema({"type": "object"})
        if kind == "regex":
            return c.compile_regex(REGEX)
        if kind == "choice":
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(x) for x in CHOICES))
        if kind == "ebnf":
            return c.compile_grammar(GBNF)
        if kind.startswith("schema:"):
            return c.compile_json_schema(kind[len("schema:"):], strict_mode=self.strict)
        raise KeyError(kind)

    def compile_cold(self, kind, compiler=None):
        return self._compile(compiler or self.new_compiler(), kind)

    def compile_cached(self, kind_and_compiler):
        kind, c = kind_and_compiler
        return self._compile(c, kind)

    def new_matcher(self, compiled):
        return xgr.GrammarMatcher(compiled)

    def warnings(self, compiled):
        return []

    def fill(self, m, bm, i=0):
        m.fill_next_token_bitmask(bm, i)

    def fill_batch(self, ms, bm):
        self.batch.batch_fill_next_token_bitmask(ms, bm)

    def accept(self, m, t):
        return m.accept_token(int(t))

    def accept_batch(self, ms, ts):
        return xgr.BatchGrammarMatcher.batch_accept_token(ms, [int(t) for t in ts])

    def done(self, m):
        return m.is_terminated()

    def accepting(self, m):
        return m.is_completed()

    def error(self, m):
        return ""

    def rollback(self, m, n):
        m.rollback(n)
        return True

    def lib_decode(self, ids):
        dv = self.info.decoded_vocab
        return b"".join(dv[i] for i in ids if i not in self.eos)


# ----------------------------------------------------------------------------------------------
# random walks
# ----------------------------------------------------------------------------------------------


class Vocab:
    """Per-vocabulary token classes used to steer random walks towards termination."""

    def __init__(self, pkg, info_decoded):
        V = pkg.config.vocab_size
        self.V = V
        self.structural = np.zeros(V, bool)
        self.ws = np.zeros(V, bool)
        for i, b in enumerate(info_decoded[:V]):
            if b and any(c in b for c in b'"}],)'):
                self.structural[i] = True
            if b and not b.strip():
                self.ws[i] = True
        self.eos = set(pkg.tokenizer.eos_token_ids)
        self.eos_list = list(pkg.tokenizer.eos_token_ids)
        self.eos_mask = np.zeros(V, bool)
        self.eos_mask[self.eos_list] = True
        self.special_non_eos = np.array(sorted(set(pkg.tokenizer.special_ids) - self.eos), dtype=np.int64)


def choose(rng, bits, voc: Vocab, step):
    """bits: bool[V] of allowed tokens."""
    eos_allowed = [t for t in voc.eos_list if bits[t]]
    rest = bits & ~voc.eos_mask
    any_rest = rest.any()
    if eos_allowed and (not any_rest or rng.random() < 0.5):
        return eos_allowed[0]
    if rng.random() < 0.35 or step > 300:
        struct = np.flatnonzero(rest & voc.structural)
        if len(struct):
            return int(rng.choice(struct))
    if rng.random() < 0.9:
        nows = np.flatnonzero(rest & ~voc.ws)
        if len(nows):
            return int(rng.choice(nows))
    return int(rng.choice(np.flatnonzero(rest)))


def walk(lib, compiled, voc, seed, max_tokens=600, fresh_matcher=None, timings=None):
    """A random walk over the allowed tokens; returns (ids, status, special_leak_count)."""
    rng = np.random.default_rng(seed)
    m = fresh_matcher if fresh_matcher is not None else lib.new_matcher(compiled)
    bm = xgr.allocate_token_bitmask(1, voc.V)
    ids = []
    leaks = 0
    status = "cap"
    for step in range(max_tokens):
        if lib.done(m):
            status = "terminated"
            break
        t0 = now()
        lib.fill(m, bm, 0)
        if timings is not None:
            timings.append(now() - t0)
        bits = np.unpackbits(bm[0].numpy().view(np.uint8), bitorder="little")[: voc.V].astype(bool)
        if len(voc.special_non_eos):
            leaks = max(leaks, int(bits[voc.special_non_eos].sum()))
        if not bits.any():
            status = "dead-end(empty mask) " + lib.error(m)
            break
        t = choose(rng, bits, voc, step)
        if not lib.accept(m, t):
            status = "rejected own token " + lib.error(m)
            break
        ids.append(t)
    else:
        if lib.done(m):
            status = "terminated"
    return ids, status, leaks


# ----------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------


def bench_setup(lib, reps):
    out = {}
    for label, fn in lib.setup_variants().items():
        ts = []
        for _ in range(reps):
            t0 = now()
            fn()
            ts.append(now() - t0)
        out[label] = {"median_s": med(ts), "first_s": ts[0], "all_s": ts}
    if isinstance(lib, XGR):
        ts = []
        lib.setup()
        for _ in range(reps):
            t0 = now()
            lib.new_compiler()
            ts.append(now() - t0)
        out["GrammarCompiler(info) construction"] = {"median_s": med(ts), "first_s": ts[0], "all_s": ts}
    return out


def bench_compile(lib, kind, reps):
    res = {}
    cold, ttfm = [], []
    for r in range(reps):
        comp = lib.new_compiler()  # xgrammar: empty cache; llguidance: no compiler object
        t0 = now()
        c = lib.compile_cold(kind, comp)
        cold.append(now() - t0)
        bm = xgr.allocate_token_bitmask(1, lib.V)
        t1 = now()
        m = lib.new_matcher(c)
        lib.fill(m, bm, 0)
        ttfm.append(cold[-1] + now() - t1)
    res["cold_ms"] = med(cold) * 1e3
    res["cold_first_ms"] = cold[0] * 1e3
    res["ttfm_ms"] = med(ttfm) * 1e3
    cached, mk = [], []
    for r in range(max(5, reps)):
        t0 = now()
        if isinstance(lib, XGR):
            c2 = lib.compile_cached((kind, comp))
        else:
            c2 = lib.compile_cached(c)
        cached.append(now() - t0)
        t0 = now()
        lib.new_matcher(c if not isinstance(lib, XGR) else c2)
        mk.append(now() - t0)
    res["cached_ms"] = med(cached) * 1e3
    res["matcher_ms"] = med(mk) * 1e3
    if isinstance(lib, XGR):
        res["mem_bytes"] = c.memory_size_bytes
    res["warnings"] = lib.warnings(c)
    return res, c


def bench_masks(lib, compiled, kind, voc, n_steps, reps, n_walks):
    """Generate walks (own matcher), then replay them timing fill-mask at batch 1 and 16."""
    validate = validator(kind)
    # cold walk: the very first masks on a freshly compiled grammar
    cold_t = []
    fresh = lib.compile_cold(kind)
    ids0, st0, _ = walk(lib, fresh, voc, seed=0, fresh_matcher=lib.new_matcher(fresh), timings=cold_t)
    walks = []
    stats = {"valid": 0, "invalid": [], "status": {}, "special_leak_max": 0, "decode_mismatch": 0}
    for s in range(n_walks):
        ids, st, leak = walk(lib, compiled, voc, seed=s)
        walks.append(ids)
        stats["status"][st.split(" ")[0]] = stats["status"].get(st.split(" ")[0], 0) + 1
        stats["special_leak_max"] = max(stats["special_leak_max"], leak)
        text = voc_pkg_decode(lib, ids)
        if lib.lib_decode(ids).decode("utf-8", "replace") != text:
            stats["decode_mismatch"] += 1
        if st == "terminated":
            ok, why = validate(text)
            if ok:
                stats["valid"] += 1
            else:
                stats["invalid"].append((text[:200], why))
    lens = [len(w) for w in walks]
    stats["walk_len_median"] = med(lens)
    usable = [w for w in walks if w]

    # ---- batch 1 ----
    b1, acc1 = [], []
    bm1 = xgr.allocate_token_bitmask(1, voc.V)
    for r in range(reps):
        steps = 0
        wi = 0
        while steps < n_steps:
            w = usable[wi % len(usable)]
            wi += 1
            m = lib.new_matcher(compiled)
            for t in w:
                if steps >= n_steps:
                    break
                t0 = now()
                lib.fill(m, bm1, 0)
                b1.append(now() - t0)
                t0 = now()
                ok = lib.accept(m, t)
                acc1.append(now() - t0)
                assert ok, (lib.name, kind, lib.error(m))
                steps += 1

    # ---- batch 16 ----
    B = 16

    def run16(batched):
        per_step, acc = [], []
        bm = xgr.allocate_token_bitmask(B, voc.V)
        cursors = []
        for k in range(B):
            cursors.append({"wi": k, "pos": 0, "m": lib.new_matcher(compiled)})
        for step in range(n_steps):
            for cur in cursors:  # advance to a next walk when one has finished (untimed)
                if cur["pos"] >= len(usable[cur["wi"] % len(usable)]):
                    cur["wi"] += B
                    cur["pos"] = 0
                    cur["m"] = lib.new_matcher(compiled)
            ms = [c["m"] for c in cursors]
            t0 = now()
            if batched:
                lib.fill_batch(ms, bm)
            else:
                for i, m in enumerate(ms):
                    lib.fill(m, bm, i)
            per_step.append(now() - t0)
            toks = [usable[c["wi"] % len(usable)][c["pos"]] for c in cursors]
            t0 = now()
            if batched:
                oks = lib.accept_batch(ms, toks)
            else:
                oks = [lib.accept(m, t) for m, t in zip(ms, toks)]
            acc.append(now() - t0)
            assert all(oks), (lib.name, kind)
            for c in cursors:
                c["pos"] += 1
        return per_step, acc

    seq16, seqacc = [], []
    par16, paracc = [], []
    for r in range(reps):
        a, b = run16(False)
        seq16 += a
        seqacc += b
        a, b = run16(True)
        par16 += a
        paracc += b
    ms = 1e3
    return {
        "cold_walk_med_ms": med(cold_t[:n_steps]) * ms, "cold_walk_p90_ms": p90(cold_t[:n_steps]) * ms,
        "cold_walk_max_ms": max(cold_t) * ms if cold_t else float("nan"),
        "b1_med_ms": med(b1) * ms, "b1_p90_ms": p90(b1) * ms, "b1_max_ms": max(b1) * ms, "b1_n": len(b1),
        "b1_accept_med_ms": med(acc1) * ms,
        "b16_seq_med_ms": med(seq16) * ms, "b16_seq_p90_ms": p90(seq16) * ms,
        "b16_par_med_ms": med(par16) * ms, "b16_par_p90_ms": p90(par16) * ms,
        "b16_seq_accept_med_ms": med(seqacc) * ms, "b16_par_accept_med_ms": med(paracc) * ms,
        "walks": stats,
    }


PKGS = {}


def voc_pkg_decode(lib, ids):
    return lib.pkg.tokenizer.decode(ids)


def bench_correctness_nested(lib, compiled, voc, n=20):
    validate = validator("nested_schema")
    out = {"valid": 0, "n": n, "failures": [], "samples": [], "status": {}}
    for s in range(1000, 1000 + n):
        ids, st, leak = walk(lib, compiled, voc, seed=s, max_tokens=1500)
        text = lib.pkg.tokenizer.decode(ids)
        out["status"][st.split(" ")[0]] = out["status"].get(st.split(" ")[0], 0) + 1
        ok, why = validate(text) if st == "terminated" else (False, st)
        if ok:
            out["valid"] += 1
        else:
            out["failures"].append({"seed": s, "why": why, "text": text[:300]})
        if len(out["samples"]) < 2:
            out["samples"].append(text[:400])
    return out


FEATURES = [
    ("format: date-time", {"type": "string", "format": "date-time"}, '"2024-01-02T03:04:05Z"', '"hello"'),
    ("format: email", {"type": "string", "format": "email"}, '"a@b.co"', '"hello"'),
    ("format: uuid", {"type": "string", "format": "uuid"}, '"123e4567-e89b-12d3-a456-426614174000"', '"x"'),
    ("pattern", {"type": "string", "pattern": "^[a-z]{3}$"}, '"abc"', '"abcd"'),
    ("pattern with \\d (ASCII digits only, as ECMA-262)", {"type": "string", "pattern": "^\\d{3}$"}, '"123"', '"\u0661\u0662\u0663"'),
    ("raw control char in a string with maxLength (must be refused)", {"type": "string", "maxLength": 40}, '"ab"', '"a\x18b"'),
    ("minLength/maxLength", {"type": "string", "minLength": 3, "maxLength": 5}, '"abcd"', '"ab"'),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1,2]", "[1,1]"),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, "15", "7"),
    ("$ref + $defs", {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}},
                                        "required": ["x"], "additionalProperties": False}},
                      "type": "object", "properties": {"p": {"$ref": "#/$defs/pt"}}, "required": ["p"],
                      "additionalProperties": False},
     '{"p":{"x":1}}', '{"p":{"x":"a"}}'),
    ("additionalProperties: false", {"type": "object", "properties": {"a": {"type": "integer"}},
                                     "additionalProperties": False}, '{"a":1}', '{"a":1,"b":2}'),
    ("(no additionalProperties) extra key allowed?", {"type": "object", "properties": {"a": {"type": "integer"}}},
     '{"a":1,"b":2}', None),
    ("minimum/exclusiveMaximum (number)", {"type": "number", "minimum": 1.5, "exclusiveMaximum": 10},
     "2.5", "10"),
    ("minimum (number, below)", {"type": "number", "minimum": 1.5, "exclusiveMaximum": 10}, "9.5", "1"),
    ("minimum/maximum (integer)", {"type": "integer", "minimum": 0, "maximum": 100}, "42", "101"),
    ("minItems/maxItems", {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
     "[1,2]", "[1,2,3]"),
    ("minProperties", {"type": "object", "minProperties": 1}, '{"a":1}', "{}"),
    ("enum", {"enum": ["a", 1, None]}, "1", '"b"'),
    ("const", {"const": "x"}, '"x"', '"y"'),
    ("anyOf", {"anyOf": [{"type": "integer"}, {"type": "string"}]}, "1", "true"),
    ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "string"}]}, '"s"', "true"),
    ("allOf", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
     '{"a":1,"b":2}', '{"a":1}'),
    ("not", {"not": {"type": "string"}}, "1", '"s"'),
    ("patternProperties", {"type": "object", "patternProperties": {"^x_": {"type": "integer"}},
                           "additionalProperties": False}, '{"x_a":1}', '{"y":1}'),
    ("if/then/else", {"if": {"type": "integer"}, "then": {"minimum": 5}, "else": {"type": "string"}},
     "7", "3"),
    ("recursive $ref", {"$defs": {"n": {"type": "object", "properties": {"c": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
                                        "additionalProperties": False}}, "$ref": "#/$defs/n"},
     '{"c":[{"c":[]}]}', '{"c":[{"d":1}]}'),
]


def run_instance(lib, compiled, text):
    """Feed the nanoinfer tokenization of `text` + EOS; True when the whole thing is accepted."""
    ids = lib.pkg.tokenizer.encode(text, add_special_tokens=False)
    m = lib.new_matcher(compiled)
    for t in ids:
        if not lib.accept(m, t):
            return False
    return bool(lib.accepting(m)) and lib.accept(m, lib.eos[0])


def bench_features(lib):
    rows = {}
    for name, schema, pos, neg in FEATURES:
        kind = "schema:" + json.dumps(schema)
        row = {}
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                c = lib.compile_cold(kind)
            row["warnings"] = [str(x.message) for x in w] + list(lib.warnings(c))
        except Exception as e:  # noqa: BLE001
            row["result"] = "REJECTED"
            row["error"] = str(e).splitlines()[0][:200] if str(e) else repr(e)
            rows[name] = row
            continue
        row["pos"] = run_instance(lib, c, pos)
        row["neg"] = run_instance(lib, c, neg) if neg is not None else None
        if neg is None:
            row["result"] = "allows extra keys (spec)" if row["pos"] else "forbids extra keys (non-spec)"
        elif row["pos"] and not row["neg"]:
            row["result"] = "enforced"
        elif row["pos"] and row["neg"]:
            row["result"] = "IGNORED"
        elif not row["pos"] and not row["neg"]:
            row["result"] = "over-restrictive (rejects valid)"
        else:
            row["result"] = "WRONG"
        rows[name] = row
    return rows


def bench_rollback(lib, compiled, voc):
    """Consume 20 tokens, rollback 10, check the mask equals the one seen 10 tokens back."""
    ids, _, _ = walk(lib, compiled, voc, seed=3, max_tokens=60)
    ids = ids[:20]
    m = lib.new_matcher(compiled)
    bm = xgr.allocate_token_bitmask(1, voc.V)
    masks = []
    for t in ids:
        lib.fill(m, bm, 0)
        masks.append(bm.clone())
        lib.accept(m, t)
    k = len(ids) // 2
    t0 = now()
    ok = lib.rollback(m, len(ids) - k)
    dt = now() - t0
    lib.fill(m, bm, 0)
    same = bool(torch.equal(bm, masks[k]))
    # and continue after the rollback
    again = all(lib.accept(m, t) for t in ids[k:])
    return {"rollback_ok": bool(ok), "mask_equal_after_rollback": same, "reaccept_ok": again,
            "rollback_ms": dt * 1e3, "n_rolled_back": len(ids) - k}


def bench_apply(pkg, bitmask16, reps):
    V = pkg.config.vocab_size
    src = torch.randn(16, V, dtype=torch.float32)
    out = {}

    def ref(logits, mask):
        bits = ((mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().reshape(mask.shape[0], -1)
        logits.masked_fill_(~bits[:, : logits.shape[1]], float("-inf"))

    expect = src.clone()
    ref(expect, bitmask16)

    variants = {
        "xgrammar.apply_token_bitmask_inplace (C++ cpu kernel)": lambda lg: xgr.apply_token_bitmask_inplace(lg, bitmask16),
        "llguidance.torch.apply_token_bitmask_inplace (torch.compile)": lambda lg: llgt.apply_token_bitmask_inplace(lg, bitmask16),
        "llguidance.numpy.apply_token_bitmask_inplace": None,
        "plain torch eager (unpack bits + masked_fill_)": lambda lg: ref(lg, bitmask16),
    }
    npmask = bitmask16.numpy()
    for name, fn in variants.items():
        try:
            ts = []
            first = None
            for r in range(reps + 1):
                lg = src.clone()
                if fn is None:
                    arr = lg.numpy()
                    t0 = now()
                    llgnp.apply_token_bitmask_inplace(arr, npmask)
                else:
                    t0 = now()
                    fn(lg)
                dt = now() - t0
                if r == 0:
                    first = dt
                    correct = bool(torch.equal(lg, expect))
                else:
                    ts.append(dt)
            out[name] = {"median_ms": med(ts) * 1e3, "first_call_ms": first * 1e3, "correct": correct}
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    # torch.compile's first call in a fresh process with an empty inductor cache
    import subprocess
    code = ("import time,torch;torch.set_num_threads(2);import llguidance.torch as t;"
            f"V={V};lg=torch.randn(16,V);bm=torch.full((16,(V+31)//32),-1,dtype=torch.int32);"
            "s=time.perf_counter();t.apply_token_bitmask_inplace(lg,bm);print(time.perf_counter()-s)")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="grammar_bench_inductor_"))
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        out["llguidance.torch.apply_token_bitmask_inplace (torch.compile)"]["first_call_fresh_process_ms"] = float(r.stdout.strip().splitlines()[-1]) * 1e3
    except Exception as e:  # noqa: BLE001
        out["llguidance.torch.apply_token_bitmask_inplace (torch.compile)"]["first_call_fresh_process_ms"] = f"error {e}"
    return out


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--libs", nargs="*", default=["llguidance", "xgrammar", "xgrammar(dyn)"])
    ap.add_argument("--out", default="/tmp/grammar_bench")
    args = ap.parse_args()
    reps_setup = 2 if args.quick else 3
    reps_compile = 2 if args.quick else 5
    reps_mask = 1 if args.quick else 3
    n_walks = 16 if args.quick else 32
    results = {"env": {
        "torch": torch.__version__, "llguidance": llguidance.__version__,
        "xgrammar": __import__("importlib.metadata").metadata.version("xgrammar"),
        "threads": THREADS, "argv": sys.argv, "uptime_start": open("/proc/loadavg").read().strip(),
    }, "models": {}}
    for model in args.models:
        pkg = load_package(model)
        V = pkg.config.vocab_size
        print(f"=== {model}: vocab {V} (tokenizer {pkg.tokenizer.vocab_size}), eos {pkg.tokenizer.eos_token_ids}", flush=True)
        mres = results["models"][model] = {"vocab": V, "libs": {}}
        libs = []
        if "llguidance" in args.libs:
            libs.append(LLG(pkg))
        if "xgrammar" in args.libs:
            libs.append(XGR(pkg))
        if "xgrammar(dyn)" in args.libs:
            libs.append(XGR(pkg, dynamic=True))
        info_for_voc = None
        for lib in libs:
            print(f"--- {lib.name}", flush=True)
            lres = mres["libs"][lib.name] = {}
            if lib.name != "xgrammar(dyn)":
                lres["setup"] = guarded(f"{model}/{lib.name}/setup", lambda: bench_setup(lib, reps_setup))
            lib.setup()
            if info_for_voc is None and isinstance(lib, XGR):
                info_for_voc = lib.info
            if info_for_voc is None:
                hf = transformers.PreTrainedTokenizerFast(tokenizer_object=pkg.tokenizer.backend)
                info_for_voc = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=V, stop_token_ids=list(pkg.tokenizer.eos_token_ids))
            voc = Vocab(pkg, info_for_voc.decoded_vocab)
            # warm the library up with an unrelated schema so "cold" means "new schema", not "new process"
            lib.compile_cold("schema:" + json.dumps({"type": "object", "properties": {"warm": {"type": "string"}}}))
            if lib.name == "llguidance":
                mres["special_leak"] = special_leak_check(pkg, lib.tok)
                print(f"  special-token leak check: {mres['special_leak']}", flush=True)
            lres["compile"], lres["mask"] = {}, {}
            compiled = {}
            for kind in GRAMMARS:
                def do_compile(kind=kind):
                    return bench_compile(lib, kind, reps_compile)
                r, c = guarded(f"{model}/{lib.name}/compile/{kind}", do_compile)
                if isinstance(lib, XGR):
                    c = lib.compile_cold(kind, lib.compiler)
                compiled[kind] = c
                lres["compile"][kind] = r
                print(f"  compile {kind}: {r}", flush=True)
            for kind in GRAMMARS:
                def do_mask(kind=kind):
                    return bench_masks(lib, compiled[kind], kind, voc, 100, reps_mask, n_walks)
                r = guarded(f"{model}/{lib.name}/mask/{kind}", do_mask)
                lres["mask"][kind] = r
                print(f"  mask {kind}: { {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != 'walks'} }", flush=True)
                print(f"       walks: {r['walks']['valid']}/{n_walks} valid, status {r['walks']['status']}, leaks {r['walks']['special_leak_max']}, decode mismatch {r['walks']['decode_mismatch']}, invalid {r['walks']['invalid'][:2]}", flush=True)
            lres["correctness_nested"] = bench_correctness_nested(lib, compiled["nested_schema"], voc)
            print(f"  nested walks valid: {lres['correctness_nested']['valid']}/20 {lres['correctness_nested']['status']} {lres['correctness_nested']['failures'][:2]}", flush=True)
            print(f"  sample: {lres['correctness_nested']['samples'][:1]}", flush=True)
            lres["rollback"] = bench_rollback(lib, compiled["nested_schema"], voc)
            print(f"  rollback: {lres['rollback']}", flush=True)
            if lib.name != "xgrammar(dyn)":
                lres["features"] = bench_features(lib)
                for k, v in lres["features"].items():
                    print(f"  feature {k}: {v}", flush=True)
                if isinstance(lib, XGR):
                    lib.strict = False
                    lres["features_nonstrict"] = bench_features(lib)
                    lib.strict = True
                    for k, v in lres["features_nonstrict"].items():
                        print(f"  feature(strict_mode=False) {k}: {v}", flush=True)
            if lib.name == "xgrammar":
                # a realistic batch mask for apply timing: 16 matchers into the nested schema
                bm = xgr.allocate_token_bitmask(16, V)
                ms = []
                for k in range(16):
                    ids, _, _ = walk(lib, compiled["nested_schema"], voc, seed=500 + k, max_tokens=1000)
                    m = lib.new_matcher(compiled["nested_schema"])
                    for t in ids[: len(ids) // 2]:
                        lib.accept(m, t)
                    ms.append(m)
                lib.fill_batch(ms, bm)
                mres["apply"] = guarded(f"{model}/apply", lambda: bench_apply(pkg, bm, 20 if args.quick else 50))
                print(f"  apply: {mres['apply']}", flush=True)
        del pkg
    results["load_log"] = LOAD_LOG
    results["env"]["uptime_end"] = open("/proc/loadavg").read().strip()
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    write_md(results, args.out + ".md")
    print("wrote", args.out + ".json", args.out + ".md")


def f(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "n/a"
        return f"{x:.{nd}f}"
    return str(x)


def write_md(res, path):
    L = []
    env = res["env"]
    L.append("# Grammar engine benchmark: llguidance vs xgrammar (CPU, nanoinfer vocabularies)\n")
    L.append(f"llguidance {env['llguidance']}, xgrammar {env['xgrammar']}, torch {env['torch']}, "
             f"torch.set_num_threads(2), library thread pools = 2 (LLExecutor(num_threads=2), "
             f"BatchGrammarMatcher(max_threads=2), GrammarCompiler(max_threads=2)). 2-core machine.\n")
    L.append("Reproduce: `cd /work/main && .venv/bin/python /tmp/grammar_bench.py` (writes /tmp/grammar_bench.{json,md}).\n")
    L.append("Vocabularies: smollm2-135m-instruct = 49,152 tokens (byte-level BPE); gemma3-270m = 262,144 tokens (sentencepiece-style BPE with byte fallback). "
             "`xgrammar(dyn)` = GrammarCompiler(enable_dynamic_compilation=True) (token-mask cache built lazily on first use).\n")
    models = list(res["models"])
    # setup
    L.append("\n## 1. Tokenizer-info setup (one-off per engine start), median seconds\n")
    L.append("| library | method | " + " | ".join(models) + " |")
    L.append("|---|---|" + "---|" * len(models))
    labels = []
    for m in models:
        for ln, lr in res["models"][m]["libs"].items():
            for lab in lr.get("setup", {}):
                if (ln, lab) not in labels:
                    labels.append((ln, lab))
    for ln, lab in labels:
        cells = []
        for m in models:
            v = res["models"][m]["libs"].get(ln, {}).get("setup", {}).get(lab)
            cells.append(f(v["median_s"], 3) if v else "-")
        L.append(f"| {ln} | {lab} | " + " | ".join(cells) + " |")
    # compile
    for m in models:
        mr = res["models"][m]
        libs = list(mr["libs"])
        L.append(f"\n## 2. Compile time, {m} (vocab {mr['vocab']:,}), median ms\n")
        L.append("cold = schema never seen (xgrammar: fresh GrammarCompiler, i.e. empty cache; llguidance: LLMatcher() construction, which is its compile). "
                 "cached = same schema again (xgrammar: compiler cache hit; llguidance: has no cache, an engine keeps a pristine matcher and `deep_copy()`s it). "
                 "TTFM = time to first mask = cold compile + matcher creation + first fill_next_token_bitmask.\n")
        hdr = "| grammar | " + " | ".join(f"{l} cold | {l} cached | {l} TTFM" for l in libs) + " |"
        L.append(hdr)
        L.append("|---|" + "---|---|---|" * len(libs))
        for kind in GRAMMARS:
            cells = []
            for l in libs:
                c = mr["libs"][l]["compile"].get(kind, {})
                cells += [f(c.get("cold_ms")), f(c.get("cached_ms"), 3), f(c.get("ttfm_ms"))]
            L.append(f"| {kind} | " + " | ".join(cells) + " |")
    # masks
    for m in models:
        mr = res["models"][m]
        libs = list(mr["libs"])
        L.append(f"\n## 3. Per-token mask time, {m} (vocab {mr['vocab']:,}), ms (median / p90)\n")
        L.append("B1 = one matcher, fill_next_token_bitmask per step (100 steps x 3 replays of seeded random walks). "
                 "B16 seq = 16 matchers filled one after another (time per step for all 16); B16 batched = llguidance "
                 "`fill_next_token_bitmask_par(LLExecutor(2))` / xgrammar `BatchGrammarMatcher(2).batch_fill_next_token_bitmask`. "
                 "cold walk = the first walk on a freshly compiled grammar (lazy lexer / lazy mask cache).\n")
        L.append("| grammar | library | B1 med | B1 p90 | B1 max | B16 seq med | B16 seq p90 | B16 batched med | B16 batched p90 | cold-walk med | cold-walk p90 | accept B1 med |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for kind in GRAMMARS:
            for l in libs:
                r = mr["libs"][l]["mask"].get(kind)
                if not r:
                    continue
                L.append(f"| {kind} | {l} | {f(r['b1_med_ms'], 3)} | {f(r['b1_p90_ms'], 3)} | {f(r['b1_max_ms'], 2)} | "
                         f"{f(r['b16_seq_med_ms'], 2)} | {f(r['b16_seq_p90_ms'], 2)} | {f(r['b16_par_med_ms'], 2)} | "
                         f"{f(r['b16_par_p90_ms'], 2)} | {f(r['cold_walk_med_ms'], 3)} | {f(r['cold_walk_p90_ms'], 3)} | {f(r['b1_accept_med_ms'], 3)} |")
    # apply
    L.append("\n## 4. Applying a [16, vocab] int32 bitmask to float32 logits, median ms (50 reps)\n")
    L.append("| implementation | " + " | ".join(models) + " | first call (" + ", ".join(models) + ") | matches reference |")
    L.append("|---|" + "---|" * len(models) + "---|---|")
    names = []
    for m in models:
        for n in res["models"][m].get("apply", {}):
            if n not in names:
                names.append(n)
    for n in names:
        cells, firsts, corr = [], [], []
        for m in models:
            v = res["models"][m].get("apply", {}).get(n, {})
            if "error" in v:
                cells.append("error: " + v["error"][:60])
                firsts.append("-")
            else:
                cells.append(f(v.get("median_ms"), 3))
                firsts.append(f(v.get("first_call_ms"), 1))
                corr.append(str(v.get("correct")))
        L.append(f"| {n} | " + " | ".join(cells) + " | " + ", ".join(firsts) + " | " + ", ".join(corr) + " |")
    fr = [res["models"][m].get("apply", {}).get("llguidance.torch.apply_token_bitmask_inplace (torch.compile)", {}).get("first_call_fresh_process_ms") for m in models]
    L.append(f"\nllguidance.torch's first call in a fresh process with an empty inductor cache (torch.compile): "
             + ", ".join(f"{m}: {f(x / 1e3 if isinstance(x, float) else x, 2)} s" for m, x in zip(models, fr)) + ".\n")
    # correctness
    L.append("\n## 5. Correctness\n")
    L.append("Nested schema: 20 seeded random walks (uniform over allowed tokens, steered towards closing tokens so that walks end), "
             "decoded with `pkg.tokenizer.decode(ids)` and validated with `jsonschema` (Draft 2020-12). "
             "Also: all timing walks of every grammar were checked (json.loads + jsonschema / regex / choice / arithmetic parser); "
             "'special leak' = max number of non-EOS special tokens (e.g. <|im_start|>, <unused0>) ever allowed by a mask; "
             "'decode mismatch' = library's own byte view of the tokens differs from nanoinfer's decode.\n")
    L.append("| model | library | nested: valid / 20 | all timing walks valid / terminated | special leak | decode mismatch | rollback |")
    L.append("|---|---|---|---|---|---|---|")
    for m in models:
        for l, lr in res["models"][m]["libs"].items():
            cn = lr.get("correctness_nested", {})
            tv = sum(r["walks"]["valid"] for r in lr["mask"].values())
            tt = sum(r["walks"]["status"].get("terminated", 0) for r in lr["mask"].values())
            leak = max(r["walks"]["special_leak_max"] for r in lr["mask"].values())
            dm = sum(r["walks"]["decode_mismatch"] for r in lr["mask"].values())
            rb = lr.get("rollback", {})
            rbs = f"ok={rb.get('rollback_ok')}, mask equal={rb.get('mask_equal_after_rollback')}, re-accept={rb.get('reaccept_ok')}, {f(rb.get('rollback_ms'), 3)} ms for {rb.get('n_rolled_back')} tokens"
            L.append(f"| {m} | {l} | {cn.get('valid')} / {cn.get('n')} | {tv} / {tt} | {leak} | {dm} | {rbs} |")
    L.append("\nSpecial-token leak check: non-stop special tokens (e.g. <|im_start|>, <unused0>) allowed by the mask inside a JSON string (after `{\"name\":\"`).\n")
    L.append("| model | special tokens (non-stop) | " + " | ".join(k for k in res["models"][models[0]].get("special_leak", {}) if k != "n_special_non_eos") + " |")
    L.append("|---|---|" + "---|" * (len(res["models"][models[0]].get("special_leak", {})) - 1))
    for m in models:
        sl = res["models"][m].get("special_leak", {})
        L.append(f"| {m} | {sl.get('n_special_non_eos')} | " + " | ".join(
            f"{v['allowed']} allowed" + (f" (e.g. {', '.join('`' + str(x) + '`' for x in v['examples'][:3])})" if v["examples"] else "")
            for k, v in sl.items() if k != "n_special_non_eos") + " |")
    # features
    L.append("\n## 6. JSON-schema keyword support (positive instance must pass, negative must be refused)\n")
    L.append("Checked on " + models[0] + " (the same compiler runs for both vocabularies).\n")
    cols = []
    for l, lr in res["models"][models[0]]["libs"].items():
        if "features" in lr:
            cols.append((l + (" (default strict_mode=True)" if l == "xgrammar" else ""), lr["features"]))
        if "features_nonstrict" in lr:
            cols.append((l + " strict_mode=False", lr["features_nonstrict"]))
    L.append("| keyword | " + " | ".join(c for c, _ in cols) + " |")
    L.append("|---|" + "---|" * len(cols))
    for name, *_ in FEATURES:
        cells = []
        for l, feats in cols:
            r = feats[name]
            s = r["result"]
            if r.get("error"):
                s += f": `{r['error'][:90]}`"
            if r.get("warnings"):
                s += f" (warning: {str(r['warnings'][0])[:80]})"
            cells.append(s)
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    # load
    L.append("\n## 7. Machine load during the run\n")
    retried = [x for x in res["load_log"] if x["attempt"] > 1]
    judged = [x for x in res["load_log"] if x["foreign_cores"] is not None]
    worst = max(judged, key=lambda x: x["foreign_cores"]) if judged else None
    L.append(f"loadavg at start: `{env['uptime_start']}`, at end: `{env['uptime_end']}`. "
             f"{len(res['load_log'])} guarded sections; foreign CPU (other processes) max {worst['foreign_cores'] if worst else 'n/a'} cores "
             f"in {worst['section'] if worst else ''}; sections repeated because foreign load > 0.5 cores: "
             f"{', '.join(x['section'] + ' (try ' + str(x['attempt']) + ')' for x in retried) or 'none'}.\n")
    with open(path, "w") as fh:
        fh.write("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
