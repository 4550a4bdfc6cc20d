"""The `hybridd` command. Every flag also reads an environment variable HYBRIDD_<FLAG>.

Exit codes: 0 ok, 1 error, 2 usage, 3 startup failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from hybridd import __version__
from hybridd.cli import doctor as doctor_cli
from hybridd.cli import engines as engines_cli
from hybridd.cli import install_service as install_service_cli
from hybridd.cli import tray as tray_cli
from hybridd.cli import unload as unload_cli
from hybridd.cli import wake as wake_cli
from hybridd.cli import watch as watch_cli
from hybridd.cli.waiting import showing
from hybridd.config import (
    MANAGED_KINDS,
    Config,
    config_path,
    is_loopback_host,
    load_config,
    state_dir,
    with_listen,
    with_role,
)
from hybridd.errors import ConfigError
from hybridd.systemd.journal import log_formatter

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_STARTUP = 0, 1, 2, 3
_POST_TIMEOUT_S = 60.0
_TRUE = {"1", "true", "yes", "on"}


def _flag(parser: argparse.ArgumentParser, *names: str, env: str, **kwargs: Any) -> None:
    """Add a flag whose default comes from the environment variable env."""
    value = os.environ.get(env)
    if kwargs.get("action") == "store_true":
        kwargs["default"] = value is not None and value.strip().lower() in _TRUE
    elif value is not None:
        kwargs["default"] = value
    kwargs["help"] = f"{kwargs.get('help', '')} [env {env}]".strip()
    parser.add_argument(*names, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="hybridd", description="Local OpenAI-compatible endpoint that places "
                                     "each request on local GPUs or a DGX Spark peer.")
    parser.add_argument("--version", action="version", version=f"hybridd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon")
    _config_flag(serve)
    _flag(serve, "--listen", env="HYBRIDD_LISTEN", metavar="HOST:PORT", help="override server.listen")
    _flag(serve, "--log-level", env="HYBRIDD_LOG_LEVEL", choices=("debug", "info", "warning", "error"),
          help="override server.log_level")
    _flag(serve, "--role", env="HYBRIDD_ROLE", choices=("desktop", "peer"),
          help="override node.role (a peer serves paired desktops on its LAN listener, port 11436)")
    _flag(serve, "--engine", env="HYBRIDD_ENGINE", choices=MANAGED_KINDS,
          help="the engine of models whose config names none (default: llama-server where one is built, else "
               "llama-cpp-python)")

    status = commands.add_parser("status", help="show the running daemon's models and engines")
    _url_flags(status)
    _flag(status, "--json", env="HYBRIDD_JSON", action="store_true", help="print the status object as JSON")
    watch_cli.add_arguments(status, _flag)

    plan = commands.add_parser("plan", help="what a model needs at a context, and whether it fits")
    _flag(plan, "model", env="HYBRIDD_MODEL", nargs="?", metavar="MODEL",
          help="a GGUF path, a configured model id, or a model profile name")
    _flag(plan, "--quant", env="HYBRIDD_QUANT", help="quantization of a profile model (e.g. Q4_K_M)")
    _flag(plan, "--ctx", env="HYBRIDD_CTX", type=int, help="context length in tokens")
    _flag(plan, "--kv-type", env="HYBRIDD_KV_TYPE", metavar="T", help="K and V cache type (e.g. q8_0)")
    _flag(plan, "--type-k", env="HYBRIDD_TYPE_K", metavar="T", help="K cache type")
    _flag(plan, "--type-v", env="HYBRIDD_TYPE_V", metavar="T", help="V cache type")
    _flag(plan, "--slots", env="HYBRIDD_SLOTS", type=int, default=1, help="parallel sequences (default 1)")
    _flag(plan, "--no-flash-attn", env="HYBRIDD_NO_FLASH_ATTN", action="store_true",
          help="plan without flash attention")
    _flag(plan, "--hardware", env="HYBRIDD_HARDWARE", metavar="PROFILE",
          help="plan for a hardware profile instead of this machine")
    _flag(plan, "--peer", env="HYBRIDD_PEER", action="append", metavar="PROFILE",
          help="also consider a peer with this hardware profile (repeatable; the env var takes a comma list)")
    _flag(plan, "--train", env="HYBRIDD_TRAIN", choices=("lora", "qlora", "full"),
          help="plan a fine-tune of MODEL instead of inference: its memory on one GPU and where it runs")
    _flag(plan, "--seq", env="HYBRIDD_SEQ", type=int, help="training sequence length in tokens (default 2048)")
    _flag(plan, "--batch", env="HYBRIDD_BATCH", type=int, help="training micro-batch in sequences (default 1)")
    _flag(plan, "--rank", env="HYBRIDD_RANK", type=int, help="LoRA rank (default 16)")
    _flag(plan, "--dataset-tokens", env="HYBRIDD_DATASET_TOKENS", type=int,
          help="tokens in the training set: each option predicts its time for one pass")
    _flag(plan, "--prompt-tokens", env="HYBRIDD_PROMPT_TOKENS", type=int, metavar="N",
          help="the reference request's prompt (default: half the context)")
    _flag(plan, "--max-tokens", env="HYBRIDD_MAX_TOKENS", type=int, metavar="N",
          help="the reference request's completion (default: 1024, at most a quarter of the context)")
    _flag(plan, "--engine", env="HYBRIDD_ENGINE", choices=MANAGED_KINDS,
          help="the engine of a model whose config names none (default: the one 'hybridd serve' picks; a file or "
          "profile: llama-cpp-python's buffers, the larger)")
    _flag(plan, "--json", env="HYBRIDD_JSON", action="store_true", help="print the plan as one JSON object")
    _config_flag(plan)

    pair = commands.add_parser("pair", help="on a peer: open a pairing window; on the desktop: pair with a peer",
                               description="On the peer, 'hybridd pair' prints a one-time code valid for 2 minutes, "
                               "then shows each attempt (by address) until the window closes; with --json it prints "
                               "the window and returns. On the desktop, 'hybridd pair NAME-OR-ADDRESS CODE' pairs "
                               "with it.")
    pair.add_argument("target", nargs="?", help="the peer's name (as mDNS shows it) or address[:port]")
    pair.add_argument("code", nargs="?", help="the 8-digit code the peer printed")
    _url_flags(pair)
    _flag(pair, "--json", env="HYBRIDD_JSON", action="store_true", help="print the result as JSON")

    peers = commands.add_parser("peers", help="nodes found on the LAN and paired peers with their links")
    _url_flags(peers)
    _flag(peers, "--json", env="HYBRIDD_JSON", action="store_true", help="print the peers object as JSON")

    commands.add_parser("demo", help="a desktop and a peer node on this machine: pair them, see where requests run")

    jobs = commands.add_parser(
        "jobs", help="fine-tuning jobs: list them, show one (--follow watches it train), cancel one",
        description="'hybridd jobs' lists the fine-tuning jobs (newest first); 'hybridd jobs show ID' shows one "
        "and its events, and with --follow a progress bar until it finishes (exit 0 if it succeeded, 1 if it "
        "failed or was cancelled); 'hybridd jobs cancel ID' cancels one.")
    jobs.add_argument("action", nargs="?", choices=("list", "show", "cancel"), default="list",
                      help="list (the default), show or cancel")
    jobs.add_argument("job_id", nargs="?", metavar="ID", help="the job's id (ftjob-...), for show and cancel")
    _url_flags(jobs)
    _flag(jobs, "--follow", env="HYBRIDD_FOLLOW", action="store_true",
          help="with show: print events and progress as they come until the job finishes")
    _flag(jobs, "--json", env="HYBRIDD_JSON", action="store_true",
          help="print JSON (with show --follow: one JSON line per event, then the finished job)")

    engines = commands.add_parser("engines", help=engines_cli.HELP, description=engines_cli.DESCRIPTION)
    engines_cli.add_arguments(engines)

    doctor = commands.add_parser("doctor", help=doctor_cli.HELP, description=doctor_cli.DESCRIPTION)
    doctor_cli.add_arguments(doctor)

    install_service = commands.add_parser("install-service", help=install_service_cli.HELP,
                                          description=install_service_cli.DESCRIPTION)
    install_service_cli.add_arguments(install_service)

    unload = commands.add_parser("unload", help=unload_cli.HELP)
    _url_flags(unload)
    _flag(unload, "--json", env="HYBRIDD_JSON", action="store_true", help="print the result as JSON")

    wake = commands.add_parser("wake", help=wake_cli.HELP, description=wake_cli.DESCRIPTION)
    wake_cli.add_arguments(wake)
    _url_flags(wake)

    tray = commands.add_parser("tray", help=tray_cli.HELP, description=tray_cli.DESCRIPTION)
    _url_flags(tray)
    tray_cli.add_arguments(tray, _flag)

    models = commands.add_parser("models", help="list the models the running daemon serves")
    _url_flags(models)
    _flag(models, "--json", env="HYBRIDD_JSON", action="store_true", help="print the model list as JSON")
    return parser


def _config_flag(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "--config", env="HYBRIDD_CONFIG", metavar="PATH",
          help=f"config file (default {config_path()})")


def _url_flags(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "--url", env="HYBRIDD_URL", help="the daemon's URL (default: from the config's server.listen)")
    _config_flag(parser)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    handler = {"serve": cmd_serve, "status": cmd_status, "models": cmd_models, "plan": cmd_plan, "pair": cmd_pair,
               "peers": cmd_peers, "demo": cmd_demo, "jobs": cmd_jobs, "engines": engines_cli.run,
               "doctor": doctor_cli.run, "install-service": install_service_cli.run, "unload": cmd_unload,
               "tray": lambda a: tray_cli.run(a, _daemon_url),
               "wake": lambda a: wake_cli.run(a, lambda path, body: _ask(a, path, body), sys.stdout)}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `hybridd status | head`
        return EXIT_OK


def _load(args: argparse.Namespace) -> tuple[Config, bool]:
    """The config from --config, else the default file; (config, True) when a file was found."""
    if args.config:
        return load_config(Path(args.config)), True
    path = config_path()
    if path.exists():
        return load_config(path), True
    return Config(), False


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground."""
    from hybridd.daemon import StartupError, serve
    from hybridd.engine.choice import with_chosen_engine
    from hybridd.node.catalog import build_catalog, scan_library, with_demo_model

    try:
        config, found = _load(args)
        if args.listen:
            config = with_listen(config, args.listen)
        if args.role:
            config = with_role(config, args.role)
        config, why = with_chosen_engine(config, args.engine)
        engine = config.engine.kind
        state = _state_folder(config)
    except ConfigError as exc:
        print(f"hybridd: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    if args.log_level:
        config = replace(config, server=replace(config.server, log_level=args.log_level))
    _setup_logging(config.server.log_level)
    log = logging.getLogger("hybridd")
    log.info("engine for models that name none: %s (%s)", engine, why)
    if not found:
        from hybridd.demo.model import demo_model

        name, path, options = demo_model(state / "models", engine)
        log.info("no config at %s: serving the demo model %s (write a config to serve your own models)",
                 config_path(), name)
        config = with_demo_model(config, path, name, options)
    catalog = build_catalog(config, scan_library(config.library_dirs))
    missing = [m for m in catalog.models if m.path is not None and not m.path.exists()]
    for model in missing:
        log.warning("model %s: file %s does not exist; requests for it will fail", model.name, model.path)
    from hybridd.node.resources import configured_peers, engine_builds_in_use, local_hardware

    try:
        hardware = local_hardware(config, lambda: engine_builds_in_use(config))
        peers = configured_peers(config)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_STARTUP
    for note in hardware.notes:
        log.warning("%s: placement plans this node without them; 'hybridd doctor' says how to fix it", note)
    devices = ", ".join(f"{d.name} {d.usable_bytes / 2**30:.1f} GiB" for d in hardware.devices)
    log.info("node %s: %s; peers: %s", hardware.name, devices or "no devices",
             ", ".join(p.config.name for p in peers) or "none")
    from hybridd.node.resources import node_name

    peering = (state, node_name(config))
    try:
        return _run(serve(config, catalog, hardware, peers, peering))
    except StartupError as exc:
        log.error("%s", exc)
        return EXIT_STARTUP


def _state_folder(config: Config) -> Path:
    """Where this node keeps its state (state_dir, else $XDG_STATE_HOME/hybridd), made 0700 if it is not there."""
    folder = config.state_dir or state_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise ConfigError(f"{config.source}: state_dir: {folder} is not a folder") from exc
    except OSError as exc:
        raise ConfigError(f"{config.source}: state_dir: cannot make {folder}: {exc.strerror or exc}") from exc
    return folder


def _run(main: Any) -> Any:
    """Run a coroutine on uvloop where installed (it halves the proxy's per-chunk cost), else asyncio."""
    try:
        import uvloop
    except ImportError:
        import asyncio  # here, not at the top: `hybridd status --format` runs every few seconds in a status bar

        return asyncio.run(main)
    return uvloop.run(main)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(log_formatter(os.environ, sys.stderr))  # under systemd, the journal stamps each line
    logging.basicConfig(level=level.upper(), handlers=[handler])
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _daemon_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    config, _ = _load(args)
    host = config.server.host
    if host in ("0.0.0.0", "::") or (not is_loopback_host(host) and config.server.allow_non_loopback):
        host = "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{config.server.port}"


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def _ask(args: argparse.Namespace, path: str, body: Any = None, waiting_for: str | None = None) -> Any:
    """GET path (body None) or POST body to it; a POST that takes a while says on stderr what it waits for."""
    try:
        base = _daemon_url(args)
    except ConfigError as exc:
        raise SystemExit(f"hybridd: {exc}") from exc
    try:
        if body is None:
            return _get_json(base + path)
        request = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with (showing(waiting_for or f"the daemon to answer POST {path}", sys.stderr, limit_s=_POST_TIMEOUT_S),
              urllib.request.urlopen(request, timeout=_POST_TIMEOUT_S) as response):
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code} for {path}"
        raise SystemExit(f"hybridd: {message}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SystemExit(f"hybridd: the daemon is not running at {base} ({reason}); start it with "
                         "'hybridd serve'") from exc


def cmd_status(args: argparse.Namespace) -> int:
    """Print what the running daemon is doing."""
    from hybridd.cli.views import render_status

    if args.watch or args.format:
        return watch_cli.run(args, _daemon_url)
    status = _ask(args, "/hybridd/v1/status")
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    """Print what a model needs and where it would fit."""
    from hybridd.cli.views import render_options
    from hybridd.engine.choice import with_chosen_engine
    from hybridd.errors import HybriddError
    from hybridd.node.catalog import build_catalog, scan_library
    from hybridd.node.planning import PlanRequest, make_plan
    from hybridd.place.plan import render_plan_table
    from hybridd.place.train import render_train_plan

    if not args.model:
        print("hybridd plan: a MODEL is required (a GGUF path, a configured model or a profile name)",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        config, _ = _load(args)
        # a configured model that names no engine plans with the one `hybridd serve` would give it
        config = with_chosen_engine(config, args.engine)[0]
        request = PlanRequest(
            model=args.model, quant=args.quant, ctx=args.ctx, type_k=args.type_k or args.kv_type,
            type_v=args.type_v or args.kv_type, slots=int(args.slots), flash_attn=False if args.no_flash_attn else None,
            hardware=args.hardware, peers=tuple(_peer_list(args.peer)), train=args.train, seq=args.seq,
            batch=args.batch, rank=args.rank, dataset_tokens=args.dataset_tokens,
            prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
            engine=None if args.train else args.engine,  # HYBRIDD_ENGINE is the daemon's: no bearing on a fine-tune
        )
        library = ", ".join(map(str, config.library_dirs))
        with showing(f"a scan of the model library ({library})" if library else _plan_wait(request),
                     sys.stderr) as waiting:  # a big library on a slow disk takes seconds to walk
            catalog = build_catalog(config, scan_library(config.library_dirs))
            waiting.begin(_plan_wait(request))
            result = make_plan(request, catalog)
    except (HybriddError, ValueError, OSError) as exc:
        print(f"hybridd plan: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(result, indent=2))
    elif request.train:
        print(render_train_plan(result))
    else:
        print(render_plan_table(result))
        print(render_options(result))
    return EXIT_OK


def _plan_wait(request: Any) -> str:
    """What make_plan waits for: the model's GGUF header (its vocabulary alone can be megabytes), and unless a
    hardware profile stands in, a probe of this machine's GPUs."""
    return f"{request.model}'s GGUF header" + ("" if request.hardware else " and a probe of this machine's GPUs")


def _peer_list(value: Any) -> list[str]:
    """--peer values; from the environment it is one comma-separated string."""
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    return list(value or [])


def cmd_pair(args: argparse.Namespace) -> int:
    """Open a pairing window (peer) or pair with a peer (desktop)."""
    if args.target is None:
        window = _ask(args, "/hybridd/v1/pair/open", {})
        if args.json:  # for scripts: the window, at once; GET /hybridd/v1/pair/window says what happens to it
            print(json.dumps(window, indent=2))
            return EXIT_OK
        code = f"{window['code'][:4]} {window['code'][4:]}"
        print(f"Pairing code for {window['name']}: {code}  (valid {window['expires_in_s']} s, once)")
        print(f"On the desktop run:  hybridd pair {window['name']} {window['code']}")
        print("Waiting; each attempt is shown here as it happens (Ctrl-C stops watching, the window stays open).",
              flush=True)
        return _follow_window(args, window["window"], window["expires_in_s"])
    if args.code is None:
        print("hybridd pair: give the peer's code too: hybridd pair NAME-OR-ADDRESS CODE", file=sys.stderr)
        return EXIT_USAGE
    peer = _ask(args, "/hybridd/v1/pair/connect", {"target": args.target, "code": args.code},
                waiting_for=f"{args.target} to answer the pairing")
    if args.json:
        print(json.dumps(peer, indent=2))
    else:
        print(f"paired with {peer['name']} ({peer['role']}) at {peer['address']}:{peer['port']}, "
              f"node id {peer['node_id'][:16]}…")
    return EXIT_OK


def _follow_window(args: argparse.Namespace, number: int, valid_s: float, poll_s: float = 0.5) -> int:
    """Print what happens to pairing window `number` until it closes: 0 once it paired, 1 otherwise. Meanwhile
    stderr says how long the code has been waiting for a desktop."""
    from hybridd.cli.views import render_pairing_event
    from hybridd.cli.waiting import StatusLine

    shown = 0
    line = StatusLine(sys.stderr)
    line.begin("a desktop to use the code", limit_s=valid_s)
    try:
        while True:
            report = _ask(args, "/hybridd/v1/pair/window")
            if report["window"] != number:
                line.end()
                print("hybridd: a newer 'hybridd pair' replaced this window; its code no longer works",
                      file=sys.stderr)
                return EXIT_ERROR
            if len(report["events"]) > shown:
                line.clear()
                for event in report["events"][shown:]:
                    print(render_pairing_event(event, report["opened_at"]), flush=True)
                shown = len(report["events"])
            if not report["open"]:
                break
            line.tick()
            time.sleep(poll_s)
    finally:
        line.end()
    if report["events_left_out"]:
        print(f"  ({report['events_left_out']} more attempts are not shown; the daemon log has them)")
    if report["outcome"] == "paired":
        return EXIT_OK
    print("hybridd: no pairing; run 'hybridd pair' again for a new code", file=sys.stderr)
    return EXIT_ERROR


def cmd_peers(args: argparse.Namespace) -> int:
    """Print the nodes on the LAN and the paired peers."""
    from hybridd.cli.views import render_peers

    peers = _ask(args, "/hybridd/v1/peers")
    print(json.dumps(peers, indent=2) if args.json else render_peers(peers))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Two nodes, one pairing, two requests: the product in a minute."""
    from hybridd.demo.run import run_demo

    try:
        return run_demo()
    except (RuntimeError, OSError) as exc:
        print(f"hybridd demo: {exc}", file=sys.stderr)
        return EXIT_ERROR


def cmd_jobs(args: argparse.Namespace) -> int:
    """List, show (and follow) or cancel fine-tuning jobs."""
    from hybridd.cli import jobs

    if args.action == "list" and args.job_id is not None:
        print(f"hybridd jobs: to see job {args.job_id}, run 'hybridd jobs show {args.job_id}'", file=sys.stderr)
        return EXIT_USAGE
    if args.action != "list" and args.job_id is None:
        print(f"hybridd jobs: give the job's id: hybridd jobs {args.action} ID", file=sys.stderr)
        return EXIT_USAGE
    if args.follow and args.action != "show":
        print("hybridd jobs: --follow goes with show: hybridd jobs show ID --follow", file=sys.stderr)
        return EXIT_USAGE

    def ask(path: str, body: Any) -> Any:
        return _ask(args, path, body)

    if args.action == "list":
        return jobs.list_jobs(ask, sys.stdout, args.json)
    if args.action == "cancel":
        return jobs.cancel_job(ask, sys.stdout, args.job_id, args.json)
    if args.follow:
        return jobs.follow_job(ask, sys.stdout, args.job_id, args.json, tty=sys.stdout.isatty())
    return jobs.show_job(ask, sys.stdout, args.job_id, args.json)


def cmd_unload(args: argparse.Namespace) -> int:
    """Stop the running daemon's idle engines."""
    result = _ask(args, unload_cli.UNLOAD_IDLE_PATH, {}, waiting_for=unload_cli.WAITING_FOR)
    print(json.dumps(result, indent=2) if args.json else unload_cli.render_unloaded(result))
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    """Print the models the running daemon serves."""
    from hybridd.cli.views import render_models

    models = _ask(args, "/v1/models")
    print(json.dumps(models, indent=2) if args.json else render_models(models))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
