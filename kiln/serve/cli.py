"""`kiln serve`, `kiln triton-repo` and `kiln triton-serve`."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from kiln.cli import SPEC_HELP
from kiln.config import add_build_arguments, build_config_from_args, int_in, limits_from_args

PORT = int_in(0, 65535, "a port number")  # argparse type (0: any free port)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP: OpenAI API, KServe v2 / "
                       "Triton generate, /health, /metrics")
    p.add_argument("model", nargs="?", help="engine dir, HF folder or .gguf "
                   "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: loopback only; 0.0.0.0 for all)")
    p.add_argument("--port", type=PORT, default=8000)
    p.add_argument("--api-key", default=os.environ.get("KILN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $KILN_API_KEY)")
    p.add_argument("--max-queue", type=int, default=None, metavar="N",
                   help="answer 429 when N requests are running or waiting (default: no cap)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20,
                   help="largest request body accepted (413 above it)")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: from the model's file name)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM / Ctrl-C: refuse new requests (503) and let running "
                   "ones finish for up to S seconds, then abort them (default: 30)")
    p.add_argument("--device", default="auto")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--engine-process", dest="engine_process", action="store_true",
                       default=True, help="run the engine in a child process, so the HTTP "
                       "work does not share its GIL (the default)")
    where.add_argument("--engine-in-process", dest="engine_process", action="store_false",
                       help="run the engine in a thread of the server process (debugging, "
                       "profiling one process)")
    p.add_argument("--speculative-config", default=None, metavar="JSON", help=SPEC_HELP)
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    add_build_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("triton-repo", help="write a Triton Inference Server model "
                       "repository (Python backend) that runs an engine")
    p.add_argument("engine_dir")
    p.add_argument("-o", "--output", required=True, help="model repository folder")
    p.add_argument("--model-name", default="kiln")
    p.add_argument("--copy-engine", action="store_true",
                   help="copy the engine into the repository (else it is referenced by path)")
    p.add_argument("--device", default="auto", help="device the model runs on in Triton")
    p.add_argument("--tensorrt-llm", action="store_true",
                   help="write TensorRT-LLM's inflight_batcher_llm models instead (preprocessing,"
                   " tensorrt_llm, postprocessing, ensemble: its tensor names and types)")
    p.add_argument("--triton-env", default=os.environ.get("KILN_TRITON_ENV"),
                   help="a venv with nvidia-pytriton: print the `kiln triton-serve` command")
    p.set_defaults(func=cmd_triton_repo)

    p = sub.add_parser("triton-serve", help="run Triton Inference Server (from the "
                       "nvidia-pytriton wheel in a venv of its own) on a model repository")
    p.add_argument("repository", help="a model repository, e.g. from `kiln triton-repo`")
    p.add_argument("--triton-env", default=os.environ.get("KILN_TRITON_ENV"),
                   help="venv with nvidia-pytriton and numpy<2 (default: $KILN_TRITON_ENV)")
    p.add_argument("--host", default="127.0.0.1", help="address of all three endpoints")
    p.add_argument("--http-port", type=PORT, default=8000)
    p.add_argument("--grpc-port", type=PORT, default=8001)
    p.add_argument("--metrics-port", type=PORT, default=8002)
    p.add_argument("--print-command", action="store_true",
                   help="print the environment and command instead of running them")
    p.set_defaults(func=cmd_triton_serve)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def cmd_serve(args: argparse.Namespace) -> None:
    from kiln.errors import KilnError
    from kiln.serve.app import ServerConfig, build_app
    from kiln.serve.async_llm import AsyncLLM
    from kiln.serve.server import check_listen, run_server

    if not args.shutdown_timeout >= 0:  # (NaN too; inf: running requests are never cut)
        raise KilnError(f"--shutdown-timeout must be a number of seconds >= 0, got "
                        f"{args.shutdown_timeout}")
    if args.max_queue is not None and args.max_queue < 1:
        raise KilnError("--max-queue must be at least 1")
    if args.max_body_bytes < 1:
        raise KilnError(f"--max-body-bytes must be at least 1 (every request body larger is "
                        f"refused with 413), got {args.max_body_bytes}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise KilnError("--served-model-name must not be empty (leave it out for the source "
                        "checkpoint's name)")
    check_listen(args.host, args.port)  # before the model loads, not after
    if not _is_loopback(args.host) and not args.api_key:
        print(f"kiln: warning: serving on {args.host} without --api-key: anyone who can "
              "reach this port can use the model", file=sys.stderr)
    llm = AsyncLLM.from_model(args.model, build_config_from_args(args), max_queue=args.max_queue,
                              engine_process=args.engine_process,
                              log_level=args.log_level,
                              device=args.device, speculative_config=args.speculative_config,
                              **limits_from_args(args))
    config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key,
                          max_body_bytes=args.max_body_bytes,
                          served_model_name=args.served_model_name, log_level=args.log_level,
                          shutdown_timeout=args.shutdown_timeout)
    try:
        run_server(build_app(llm, config), config)
    finally:
        llm.shutdown()


def cmd_triton_repo(args: argparse.Namespace) -> None:
    from kiln.serve.triton_repo import write_triton_repo

    model_dir = write_triton_repo(args.engine_dir, args.output, args.model_name,
                                  args.copy_engine, args.device, args.tensorrt_llm)
    env = f" --triton-env {args.triton_env}" if args.triton_env else " --triton-env ENV"
    print(f"kiln: wrote {model_dir}; start Triton with: kiln triton-serve {args.output}{env}"
          " (see docs/serving.md)")


def cmd_triton_serve(args: argparse.Namespace) -> None:
    import shlex

    from kiln.errors import KilnError
    from kiln.serve.triton_server import INSTALL_HINT, prepare_triton_env, tritonserver_command

    if not args.triton_env:
        raise KilnError(f"--triton-env is required (or $KILN_TRITON_ENV): {INSTALL_HINT}")
    if not os.path.isdir(args.repository):
        raise KilnError(f"model repository {args.repository} does not exist "
                        "(write one with `kiln triton-repo`)")
    env = prepare_triton_env(args.triton_env)
    if not args.print_command:  # a port in use: one line now, not Triton's log later
        from kiln.serve.server import check_listen

        for port, flag in ((args.http_port, "--http-port"), (args.grpc_port, "--grpc-port"),
                           (args.metrics_port, "--metrics-port")):
            check_listen(args.host, port, flag)
    argv, environ = tritonserver_command(env, args.repository, args.http_port, args.grpc_port,
                                         args.metrics_port, args.host)
    if args.print_command:
        print(f"PATH={shlex.quote(environ['PATH'])} "
              f"LD_LIBRARY_PATH={shlex.quote(environ['LD_LIBRARY_PATH'])} "
              + shlex.join(argv))
        return
    sys.stdout.flush()
    os.execve(argv[0], argv, environ)  # Triton takes over the process (and its signals)
