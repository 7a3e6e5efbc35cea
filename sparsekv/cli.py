"""`sparsekv serve | generate | eval | bench | calibrate`.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
this file only wires them and the engine flags they share (named as vLLM names them).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

SUBCOMMANDS = {
    "serve": ("sparsekv.api.server", "OpenAI-compatible HTTP server"),
    "generate": ("sparsekv.generate", "offline batch generation over JSONL"),
    "eval": ("sparsekv.eval.cli", "long-context eval (RULER-style), dense vs sparse"),
    "calibrate": ("sparsekv.calibrate", "propose per-model parameters for a sparse method"),
}
BENCH = {
    "attention": ("sparsekv.bench.attention", "attention-only time, sparse vs dense"),
    "serve": ("sparsekv.bench.serve", "serving benchmark against an OpenAI-compatible endpoint"),
}


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Engine and sparsity flags shared by serve, generate, eval and bench."""
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--block-size", type=int, default=16, help="KV page size in tokens")
    g.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV pool")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--hf-overrides", type=json.loads, default={},
                   help='JSON laid over the model config, e.g. \'{"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}\'')
    s = p.add_argument_group("sparsity")
    s.add_argument("--sparsity-config", default=None, help="SparsityConfig JSON file (flags below override it)")
    s.add_argument("--prefill-attention", default=None, help="prefill method: dense | xattention | ...")
    s.add_argument("--decode-attention", default=None, help="decode method: dense | delta | quest | ...")
    s.add_argument("--kv-prune", default=None)
    s.add_argument("--kv-sparsity", type=float, default=None)
    s.add_argument("--kv-evict", default=None)
    s.add_argument("--kv-budget", type=int, default=None)
    s.add_argument("--ffn-sparsity", default=None, help="FFN method: none | teal | wina | chess")
    s.add_argument("--ffn-sparsity-level", type=float, default=None)
    s.add_argument("--ffn-thresholds", default=None,
                   help="calibrated FFN thresholds JSON (default: next to the model; see `sparsekv calibrate`)")


def engine_config_from_args(args: argparse.Namespace):
    """EngineConfig from the shared flags; raises ValueError with a readable message."""
    from sparsekv.config import EngineConfig, SparsityConfig

    sparsity = SparsityConfig.from_file(args.sparsity_config) if args.sparsity_config else SparsityConfig()
    override: dict = {}
    if args.prefill_attention:
        override["prefill"] = {"method": args.prefill_attention}
    if args.decode_attention:
        override["decode"] = {"method": args.decode_attention}
    kv = {k: v for k, v in (("prune", args.kv_prune), ("sparsity", args.kv_sparsity),
                            ("evict", args.kv_evict), ("budget", args.kv_budget)) if v is not None}
    if kv:
        override["kv"] = kv
    ffn = {k: v for k, v in (("method", args.ffn_sparsity), ("sparsity", args.ffn_sparsity_level)) if v is not None}
    if ffn:
        override["ffn"] = ffn
    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory, gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching, seed=args.seed, hf_overrides=args.hf_overrides,
        sparsity=sparsity.merged(override), ffn_thresholds=getattr(args, "ffn_thresholds", None),
        **({"served_model_name": args.served_model_name} if getattr(args, "served_model_name", None) else {}),
    )


def _add(sub, table: dict, chosen: str | None) -> None:
    """Subcommand parsers; only the chosen one imports its module (start-up stays fast)."""
    for name, (module, help_text) in table.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    words = [a for a in argv if not a.startswith("-")]
    parser = argparse.ArgumentParser(prog="sparsekv", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    _add(sub, SUBCOMMANDS, words[0] if words else None)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    _add(bench, BENCH, words[1] if words[:1] == ["bench"] and len(words) > 1 else None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"sparsekv: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
