"""The `moe-cluster` command line: `generate` runs in-process, `serve` starts the Ray Serve application."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from cluster.checkpoint import CheckpointError
from cluster.engine import InvalidRequest, LLMEngine, SamplingParams
from cluster.families import UnsupportedModelError
from cluster.precision import SETTINGS as DTYPE_SETTINGS
from deployments import start_checks, stopping

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # beside deployments/: models/demo, the bundled config's paths
LOCAL_CONFIG = PROJECT_ROOT / "deployments" / "serve_local.yaml"

DEMO_MODEL = str(PROJECT_ROOT / "models" / "demo")
GRPC_SERVICER = "protos.moe_serving_pb2_grpc.add_MoeServingServicer_to_server"
SHARED_SERVE = ("Serve already runs on this cluster: its proxies keep their own HTTP/gRPC settings (host, ports, "
                "gRPC services; not --host / --http-port / --grpc-port), and stopping removes only this application")


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InvalidRequest(f"--prompt-ids: expected comma-separated integers, got {text!r}", "prompt") from None


def _prefix_caching_flag(parser: argparse.ArgumentParser, default: bool | None = True) -> None:
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=default,
                        help="reuse the KV cache of prompts that start like earlier ones (default: on"
                             + ("" if default else "; overrides the config") + ")")


def cmd_generate(args: argparse.Namespace) -> int:
    start_checks.check_context(args.max_model_len, args.model)
    engine = LLMEngine.from_pretrained(args.model, device=args.device, show_progress=not args.quiet,
                                       max_model_len=args.max_model_len, dtype=args.dtype,
                                       enable_prefix_caching=args.enable_prefix_caching)
    prompt = _token_ids(args.prompt_ids) if args.prompt_ids is not None else args.prompt
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()),
                            logprobs=args.logprobs)
    [out] = engine.generate([prompt], params)
    if args.json:
        result = {"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason,
                  "prompt_ids": out.prompt_ids, "usage": {"prompt_tokens": len(out.prompt_ids),
                                                          "completion_tokens": len(out.token_ids),
                                                          "expert_tokens": out.expert_tokens}}
        if args.logprobs is not None:
            result["logprobs"] = [{"token_id": s.token_id, "logprob": s.logprob,
                                   "top_logprobs": [[t, lp] for t, lp in s.top_logprobs]} for s in out.logprobs]
        print(json.dumps(result))
    else:
        text = out.text if engine.tokenizer else " ".join(map(str, out.token_ids))
        print((args.prompt or "") + text)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Capacity plan from config.json alone (cluster/sizing.py): works before any weights are downloaded."""
    from cluster.sizing import format_sizing, sizing_from_config

    start_checks.check_context(args.max_model_len, args.model)
    if args.gpus is not None or args.host_memory is not None or args.profile is not None:
        return _tier_plan(args)
    p = sizing_from_config(args.model, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, workers=args.workers,
                         gpu_memory=args.gpu_memory, gpu_memory_utilization=args.gpu_memory_utilization,
                         max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs)
    print(json.dumps(p.as_dict()) if args.json else format_sizing(p))
    return 0


def _tier_plan(args: argparse.Namespace) -> int:
    """What fits in which tier (cluster/tier_plan.py): fast tier on the GPUs, the rest in host memory."""
    from cluster.tier_plan import format_tier_plan, tier_plan_from_config

    p = tier_plan_from_config(args.model, gpus=2 if args.gpus is None else args.gpus, gpu_memory=args.gpu_memory,
                              host_memory=args.host_memory or "256GiB", profile=args.profile, dtype=args.dtype,
                              kv_cache_dtype=args.kv_cache_dtype, kv_tokens=args.kv_tokens,
                              gpu_memory_utilization=args.gpu_memory_utilization)
    print(json.dumps(p.as_dict()) if args.json else format_tier_plan(p))
    return 0


def _start_ray(address: str | None, cfg, host: str) -> None:
    from deployments.local import join_ray, start_local_ray

    if address:
        join_ray(address, host, cfg.max_body_bytes)
        return
    start_checks.check_local_gpus(cfg)
    # Embedded single-node cluster: enough logical CPUs for the routers and every worker
    # (Ray CPUs are scheduling units here; torch threads are set per replica), every port on `host`.
    needed = cfg.routers.max * cfg.routers.num_cpus + cfg.num_workers * cfg.worker.num_cpus + 1
    start_local_ray(host, needed, cfg.max_body_bytes)


def _local_path(path: str | None) -> str | None:
    """A relative path as the replicas must see it: from the directory the command runs in, else (the
    bundled config's models/demo and deployments/policies/) from the project's root."""
    if path is None or Path(path).is_absolute():
        return path
    if Path(path).exists():
        return str(Path(path).resolve())
    bundled = PROJECT_ROOT / path
    return str(bundled) if bundled.exists() else path  # else as given: the error names the path the user wrote


def _config_paths(app_args: dict) -> dict:
    return {**app_args, **{k: _local_path(app_args[k]) for k in ("model", "policy_file") if app_args.get(k)}}


def _overrides(args: argparse.Namespace, app_conf: dict) -> dict:
    out = {"model": _local_path(args.model), "num_workers": args.num_workers, "max_model_len": args.max_model_len,
           "api_key": args.api_key, "dtype": args.dtype, "tool_call_parser": args.tool_call_parser,
           "reasoning_parser": args.reasoning_parser,
           "app_name": app_conf.get("name", "moe"), "enable_prefix_caching": args.enable_prefix_caching}
    routers = app_conf.get("args", {}).get("routers", {})
    if not isinstance(routers, dict):  # merged with the flags below, so checked here rather than by pydantic
        raise ValueError(f"bad application config: routers: expected a mapping (min, max, ...), got {routers!r}")
    if args.routers is not None:
        out["routers"] = routers = {**routers, "min": args.routers, "max": args.routers}
    if args.prefix_aware_routing is not None:
        out["routers"] = {**routers, "prefix_aware": args.prefix_aware_routing}
    return {k: v for k, v in out.items() if v is not None}


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.config import app_config, load_serve_config
    from deployments.local import local_host

    host = args.host if args.address else local_host(args.host)  # a local start: Ray's ports on it too
    conf = load_serve_config(args.config)
    app_conf = conf["applications"][0]
    cfg = app_config({**_config_paths(app_conf.get("args", {})), **_overrides(args, app_conf)})
    http = {**conf.get("http_options", {}), "host": host, **({"port": args.http_port} if args.http_port else {})}
    grpc = {**conf.get("grpc_options", {}), **({"port": args.grpc_port} if args.grpc_port else {})}
    start_checks.check_key(cfg.api_key)  # --api-key's, else the config's
    start_checks.check_context(args.max_model_len, cfg.model)
    ports = {"--http-port": http.get("port", 8000)}
    if grpc.get("grpc_servicer_functions") and grpc.get("port", 9000) > 0:  # else Serve starts no gRPC server
        ports["--grpc-port"] = grpc.get("port", 9000)
    start_checks.check_ports_differ(ports)
    if not args.address:
        start_checks.check_ports_free(host, ports)
    if cfg.resolved_api_key():
        grpc["enable_reflection"] = False  # the schema is not shown to callers without the key
    print(f"starting moe-cluster: model {cfg.model}, {cfg.routers.min}-{cfg.routers.max} router(s), "
          f"{cfg.num_workers} expert worker(s)", file=sys.stderr)
    app = build_app(cfg)  # before Ray starts: a checkpoint or setting it refuses costs no cluster start
    stopping.interrupt_on_stop_signals()  # until ready, a stop signal stops the start
    started_serve, deploying = True, False  # nothing of ours is on the cluster before serve.start
    try:
        _start_ray(args.address, cfg, host)
        stopping.interrupt_on_stop_signals()  # ray.init put its own SIGTERM handler in place
        if args.address and stopping.serve_running():
            started_serve = False
            _check_name_free(cfg.app_name)
            print(SHARED_SERVE, file=sys.stderr, flush=True)
        deploying = True
        serve.start(http_options=http, grpc_options=grpc)
        serve.run(app, name=cfg.app_name, route_prefix="/")
        signals = stopping.StopSignals()  # from here on: drain
    except BaseException as e:
        stopping.ignore_stop_signals()  # whatever comes next, what we deployed is removed
        stop = stopping.is_stop_exit(e)
        if stop:
            print("stopped before the application was ready", file=sys.stderr, flush=True)
        if args.address and deploying and ray.is_initialized():  # a failed start too: Serve's actors are
            stopping.remove(cfg.app_name, started_serve)           # detached, they would stay on the cluster
        if not stop:
            raise
        return 130
    print(_ready_line(http, grpc, started_serve, cfg.app_name), flush=True)
    signals.wait_stop()
    try:
        stopping.drain(serve.get_deployment_handle("controller", cfg.app_name), cfg.drain_timeout_s, signals)
    except Exception as e:  # noqa: BLE001 - a cluster that cannot drain must not keep us from stopping
        print(f"drain skipped: {e}", file=sys.stderr, flush=True)
    if args.address:
        stopping.remove(cfg.app_name, started_serve)
    else:
        serve.shutdown()  # our own cluster: everything on it is ours
    return 0


def _check_name_free(app_name: str) -> None:
    """serve.run would replace an application of that name (another moe-cluster's), and our stop delete it."""
    from ray import serve

    if app_name in serve.status().applications:
        raise ValueError(f"Serve on this cluster already runs an application named {app_name!r} (another "
                         "moe-cluster, or one a killed run left): stop or delete it, or name this one otherwise "
                         "(the application's `name` in --config)")


def _ready_line(http: dict, grpc: dict, started_serve: bool, app_name: str) -> str:
    """Where the API is: where Serve already ran, its proxies kept their own settings, not ours, and a gRPC
    call must name our application (Serve's proxy answers NOT_FOUND without it when it serves several)."""
    if not started_serve:
        http, grpc = _running_proxies()
    host, port = http["host"], http.get("port", 8000)
    base = f"http://{host}:{port}"
    served = GRPC_SERVICER in grpc.get("grpc_servicer_functions", ()) and grpc.get("port", 9000) > 0
    metadata = "" if started_serve else f", metadata application: {app_name}"
    grpc_text = (f"gRPC {host}:{grpc.get('port', 9000)} (protos/moe_serving.proto{metadata})" if served else
                 "no gRPC API (grpc_options' grpc_servicer_functions lack it)")
    return f"ready: HTTP {base}/v1/completions (OpenAI API), {grpc_text}, metrics {base}/metrics. Ctrl-C stops."


def _running_proxies() -> tuple[dict, dict]:
    import ray
    from ray.serve.context import _get_global_client

    try:
        client = _get_global_client()
        grpc = ray.get(client._controller.get_grpc_config.remote(), timeout=30)  # no public getter in Serve 2.60
        return ({"host": client.http_config.host, "port": client.http_config.port},
                {"port": grpc.port, "grpc_servicer_functions": list(grpc.grpc_servicer_functions)})
    except Exception as e:  # noqa: BLE001 - private API: a Serve that changed it must not stop a ready server
        print(f"cannot read the running Serve's proxy settings ({e}); see `serve status`", file=sys.stderr)
        return {"host": "?", "port": "?"}, {"port": "?"}


def _profile_from_text(args: argparse.Namespace) -> int:
    """Hash-routed layers' expert load from a text file's token ids alone (cluster.hash_load): no server."""
    from cluster.hash_load import profile_loads, token_frequencies
    from cluster.loader import load_hash_tables, open_model
    from cluster.profile import save_profile
    from cluster.tokenizer import TextTokenizer, missing_reason

    if not args.model:
        raise ValueError("--from-text needs --model: the checkpoint whose tokenizer and tid2eid tables to read")
    ckpt, family, cfg = open_model(args.model)
    tokenizer = TextTokenizer.from_checkpoint(args.model)
    if tokenizer is None:
        raise ValueError(f"--from-text: {missing_reason(args.model)}")
    tables = {layer: t.numpy() for layer, t in load_hash_tables(ckpt, family, cfg).items()}
    with open(args.from_text, encoding="utf-8") as f:  # line by line: a corpus need not fit in memory twice
        ids = (i for line in f for i in tokenizer.encode(line, add_special_tokens=False))
        frequencies = token_frequencies(ids, cfg.vocab_size)
    if frequencies.sum() <= 0:
        raise ValueError(f"{args.from_text}: no tokens in the file")
    loads = profile_loads(tables, frequencies, cfg.moe_layer_ids, cfg.num_experts, cfg.top_k)
    save_profile(args.out, loads, list(cfg.moe_layer_ids),
                 {"model": args.model, "from_text": args.from_text, "tokens": int(frequencies.sum()),
                  "hash_layers": sorted(tables), "even_layers": [x for x in cfg.moe_layer_ids if x not in tables]})
    print(f"wrote {args.out}: {len(tables)} hash-routed layers from {int(frequencies.sum())} tokens, the other "
          f"{len(cfg.moe_layer_ids) - len(tables)} MoE layers even; use it with `mode: static` and `profile_file:`",
          file=sys.stderr)
    return 0


def cmd_record_profile(args: argparse.Namespace) -> int:
    """Expert load over a window of live traffic (or, for hash-routed layers, from a text file's token ids)
    → a profile file for the policy's mode static."""
    if args.from_text:
        return _profile_from_text(args)
    import numpy as np
    import requests

    from cluster.profile import save_profile

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    def totals():
        body = requests.get(f"{args.url.rstrip('/')}/admin/load", headers=headers, timeout=30)
        if body.status_code == 401:
            raise ValueError(f"{args.url}: the server needs its API key (--api-key or MOE_CLUSTER_API_KEY)"
                             + (": this one was refused" if args.api_key else ""))
        body.raise_for_status()
        load = body.json()["load"]
        if load is None:
            raise ValueError("the server has no expert load yet (no router reported)")
        return load["layers"], np.asarray(load["total_tokens"], dtype=float)

    layers, before = totals()
    print(f"recording expert load for {args.seconds:g} s ...", file=sys.stderr, flush=True)
    time.sleep(args.seconds)
    _, after = totals()
    loads = after - before
    if loads.sum() <= 0:
        raise ValueError(f"no traffic reached the experts in {args.seconds:g} s: send some, then record again")
    save_profile(args.out, loads, layers, {"url": args.url, "seconds": args.seconds, "recorded_at": time.time(),
                                           "tokens": int(loads.sum())})
    print(f"wrote {args.out}: {len(layers)} layers x {loads.shape[1]} experts, {int(loads.sum())} (token, expert) "
          "pairs; use it with `mode: static` and `profile_file:` in the policy", file=sys.stderr)
    return 0


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {value:g}")
    return value


def _memory(text: str) -> str:
    """A size with its unit: a bare 80 was read as 80 bytes."""
    if text.strip().replace(".", "", 1).isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} has no unit: e.g. {text.strip()}GiB or {text.strip()}GB")
    return text


def _positive(text: str) -> int:
    """An argparse type for counts that must be ≥ 1 (0 would be read as "not given" further on)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-cluster", description="Serve Mixture-of-Experts models on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text in-process (no Ray)")
    g.add_argument("--model", default=DEMO_MODEL, help="checkpoint directory (config.json + safetensors)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer.json)")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--logprobs", type=int, default=None, help="also return the top-N logprobs per token")
    g.add_argument("--max-model-len", type=_positive, default=None)
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--dtype", default="auto", choices=DTYPE_SETTINGS,
                   help="weights and compute (auto: the checkpoint's dtype on a GPU, bfloat16 for a float32 "
                        "checkpoint; float32 on a CPU)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    _prefix_caching_flag(g)
    g.add_argument("--quiet", action="store_true", help="no loading progress on stderr")
    g.set_defaults(func=cmd_generate)
    pl = sub.add_parser("plan", help="memory and capacity plan from config.json alone (no weights needed)")
    pl.add_argument("--model", required=True, help="checkpoint directory or its config.json")
    pl.add_argument("--dtype", default="auto", help="auto (as on a GPU: the checkpoint's dtype, bfloat16 for a float32 "
                    "checkpoint) | bfloat16 | float16 | float32")
    pl.add_argument("--kv-cache-dtype", default="auto", help="auto (= dtype) | bfloat16 | float16 | float32")
    pl.add_argument("--workers", type=int, default=1, help="expert workers, one GPU each (0: all in the router)")
    pl.add_argument("--gpu-memory", type=_memory, default="80GiB", help="memory of each GPU, e.g. 80GiB, 141GB")
    pl.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9)
    pl.add_argument("--max-model-len", type=_positive, default=None, help="default: the model's context length")
    pl.add_argument("--max-num-seqs", type=_positive, default=64)
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    tiers = pl.add_argument_group("expert tiers: any of these plans a fast tier on the GPUs, the rest in host memory")
    tiers.add_argument("--gpus", type=int, default=None, help="GPUs: the router on the first, fast-tier experts on all")
    tiers.add_argument("--host-memory", type=_memory, default=None,
                       help="host tier's memory, e.g. 256GiB (default 256GiB)")
    tiers.add_argument("--profile", default=None,
                       help="load profile (moe-cluster record-profile): fast experts by load")
    tiers.add_argument("--kv-tokens", type=_positive, default=8192, help="the router's KV cache, in tokens")
    pl.set_defaults(func=cmd_plan)
    s = sub.add_parser("serve", help="serve the model on Ray Serve (HTTP + gRPC)")
    s.add_argument("--config", default=str(LOCAL_CONFIG),
                   help="Ray Serve config YAML (default: the bundled one-machine config, deployments/serve_local.yaml)")
    s.add_argument("--model", default=None, help="checkpoint directory (overrides the config)")
    s.add_argument("--max-model-len", type=_positive, default=None,
                   help="context length, prompt + reply (overrides the config; the bundled config's is 1024, "
                        "not the model's own, so that the KV cache stays small on a CPU)")
    s.add_argument("--num-workers", type=int, default=None, help="expert workers (overrides the config)")
    s.add_argument("--dtype", default=None, choices=DTYPE_SETTINGS,
                   help="weights and compute (auto: the checkpoint's dtype on a GPU, bfloat16 for a float32 "
                        "checkpoint; float32 on a CPU)")
    s.add_argument("--routers", type=int, default=None,
                   help="router replicas (attention data-parallel, each with its own KV cache; overrides the config)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address every port binds to on a local start (HTTP, gRPC, Ray's own): "
                        "127.0.0.1 (default) or 0.0.0.0 (every interface)")
    s.add_argument("--http-port", type=int, default=None)
    s.add_argument("--grpc-port", type=int, default=None)
    s.add_argument("--address", default=None, help="existing Ray cluster to join (default: start one here)")
    s.add_argument("--api-key", default=None,
                   help="require this key on every route but /health (or set MOE_CLUSTER_API_KEY)")
    s.add_argument("--tool-call-parser", default=None,
                   help="how tool calls are read from replies (hermes, qwen3_coder, deepseek_v3, deepseek_v31, "
                        "kimi_k2, glm45, mistral, openai); default: detected from the chat template")
    s.add_argument("--reasoning-parser", default=None,
                   choices=["deepseek_r1", "deepseek_v3", "qwen3", "glm45", "gpt_oss", "none"],
                   help="how thinking is split into reasoning_content; default: detected from the chat template")
    _prefix_caching_flag(s, default=None)
    s.add_argument("--prefix-aware-routing", action=argparse.BooleanOptionalAction, default=None,
                   help="send each request to the router likely to hold its prompt's prefix (default: on; "
                        "overrides the config's routers.prefix_aware)")
    s.set_defaults(func=cmd_serve)
    r = sub.add_parser("record-profile", help="record the expert load of live traffic into a profile file "
                                              "(for the autoscaling policy's mode static)")
    r.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP address")
    r.add_argument("--seconds", type=float, default=30.0, help="how long to record")
    r.add_argument("--out", required=True, help="profile file to write (JSON)")
    r.add_argument("--api-key", default=os.environ.get("MOE_CLUSTER_API_KEY"), help="if the server needs one")
    r.add_argument("--from-text", default=None,
                   help="no server: plan the hash-routed layers (DeepSeek-V4) from this text file's token "
                        "frequencies (needs --model); other MoE layers get an even load")
    r.add_argument("--model", default=None, help="with --from-text: the checkpoint directory")
    r.set_defaults(func=cmd_record_profile)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InvalidRequest, CheckpointError, UnsupportedModelError, ValueError, OSError) as e:
        print(f"moe-cluster: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
