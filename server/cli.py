"""`fl-server`: the coordinator of a federated run."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from fedgrpc.common import device, logs
from fedgrpc.common.compression import COMPRESSIONS
from fedgrpc.common.config import DEFAULT_TASK, EvaluationPlan, RunSpec, SecAggSpec
from fedgrpc.common.errors import ConfigError, FedGrpcError
from fedgrpc.common.logs import FORMATS
from fedgrpc.common.partition import SCHEMES
from fedgrpc.server import runfile
from fedgrpc.server.auth import ServerTls, load_tokens
from fedgrpc.server.http import HttpConfig
from fedgrpc.server.limits import Limits
from fedgrpc.server.strategy import STRATEGIES, StrategySettings


def build_parser() -> argparse.ArgumentParser:
    defaults, limits_defaults = RunSpec(), Limits()
    p = argparse.ArgumentParser(
        prog="fl-server", description="Coordinate a federated learning run over gRPC."
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="RUN.toml",
        help="a run file: [run] holds any of these flags without dashes, [task] the task's parameters; "
        "flags given too override it",
    )
    p.add_argument(
        "--port", type=int, default=50051, help="port to listen on; 0 picks a free one (default 50051)"
    )
    p.add_argument("--host", default="[::]", help="address to bind (default: all interfaces)")
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for history, curves and model")
    p.add_argument("--threads", type=int, default=None, help="cap the CPU threads of evaluation")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument(
        "--log-format", choices=FORMATS, default="text", help="log lines for people or one JSON object a line"
    )
    observe = p.add_argument_group("watching the run")
    observe.add_argument(
        "--http",
        type=int,
        default=None,
        metavar="PORT",
        help="serve the live dashboard and Prometheus /metrics on PORT (read-only; 0 picks a free port)",
    )
    observe.add_argument(
        "--linger",
        type=float,
        default=0.0,
        metavar="S",
        help="with --http: keep the dashboard and /metrics up S seconds after the run ends (default 0)",
    )
    observe.add_argument(
        "--http-host",
        default="127.0.0.1",
        help="address of the dashboard (default 127.0.0.1: this machine only; it shows metadata, no data)",
    )
    observe.add_argument(
        "--health-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also answer gRPC health checks, and only those, on PORT in plain text (probes that "
        "cannot speak TLS, such as Kubernetes'); same address as --host",
    )
    observe.add_argument(
        "--tensorboard",
        type=Path,
        default=None,
        metavar="DIR",
        help="write TensorBoard scalars for every round to DIR",
    )

    task = p.add_argument_group("the task (see fedgrpc.common.task)")
    task.add_argument(
        "--task",
        default=os.environ.get("FL_TASK") or DEFAULT_TASK,
        help="a task file (my_task.py), module:attribute, or an installed task's name "
        "(default: $FL_TASK, else %(default)s, the reference CIFAR-10 job)",
    )
    task.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set one of the task's parameters (repeatable; overrides [task] of --config)",
    )
    task.add_argument(
        "--data",
        default=os.environ.get("FL_DATA") or None,
        help="what the task's load_test_data reads, if it has one: the server's own test set "
        "(cifar10: a folder, .tar.gz or .npz; default $FL_DATA, else the Keras download)",
    )
    task.add_argument(
        "--init-model",
        type=Path,
        metavar="MODEL.keras",
        help="start from the weights of this saved Keras model (loaded in safe mode)",
    )
    task.add_argument("--init-seed", type=int, default=0, help="seed of the initial global weights")

    run = p.add_argument_group("the run")
    run.add_argument(
        "--rounds", type=int, default=defaults.rounds, help="federated rounds (default %(default)s)"
    )
    run.add_argument(
        "--clients",
        type=int,
        default=defaults.num_clients,
        help="clients of the run, ids 1..N (default %(default)s)",
    )
    run.add_argument("--batch-size", type=int, default=defaults.batch_size, help="(default %(default)s)")
    run.add_argument("--local-epochs", type=int, default=defaults.local_epochs, help="(default %(default)s)")
    run.add_argument(
        "--partition",
        default=defaults.partition,
        metavar="SCHEME",
        help=f"how stand-in federations cut one dataset: {', '.join(SCHEMES)} (default %(default)s)",
    )
    run.add_argument(
        "--partition-seed", type=int, default=defaults.partition_seed, help="seed of the client shards"
    )
    strategy = p.add_argument_group("strategy (see fedgrpc.server.strategy and fedgrpc.server.fedopt)")
    strategy.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="fedavg",
        help="aggregation: %(choices)s (default %(default)s)",
    )
    strategy.add_argument(
        "--server-lr",
        type=float,
        default=None,
        help="server optimizers' learning rate (fedavgm 0.1; fedadagrad, fedadam, fedyogi 0.01)",
    )
    strategy.add_argument(
        "--server-momentum",
        type=float,
        default=None,
        help="fedavgm's momentum (0.9), or the adaptive family's beta1 (0.9)",
    )
    strategy.add_argument("--server-beta2", type=float, default=None, help="fedadam, fedyogi: beta2 (0.99)")
    strategy.add_argument(
        "--server-tau", type=float, default=None, help="fedadagrad, fedadam, fedyogi: adaptivity tau (1e-3)"
    )
    strategy.add_argument(
        "--proximal-mu",
        type=float,
        default=None,
        metavar="MU",
        help="clients add MU/2 ||w - w_global||^2 to their loss (FedProx; default 0.01 with fedprox, else 0)",
    )
    strategy.add_argument(
        "--trim-fraction", type=float, default=0.2, help="trimmed-mean: share cut from each end"
    )
    strategy.add_argument("--byzantine", type=int, default=1, help="krum: how many clients may be malicious")
    run.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        default=defaults.compression,
        help="how clients send updates: %(choices)s (fp16 halves the bytes, int8 quarters them)",
    )
    run.add_argument(
        "--clients-per-round",
        type=int,
        default=None,
        metavar="K",
        help="train a seeded sample of K ready clients each round (default: all of them)",
    )
    run.add_argument("--sample-seed", type=int, default=0, help="seed of the per-round client samples")

    privacy = p.add_argument_group("differential privacy (DP-FedAvg; see fedgrpc.common.privacy)")
    privacy.add_argument(
        "--dp-clip", type=float, default=None, metavar="C", help="clip each update to L2 norm C"
    )
    privacy.add_argument(
        "--dp-noise-multiplier",
        type=float,
        default=None,
        metavar="Z",
        help="add Gaussian noise of std Z*C to the sum of updates (each weighted 1, not by examples)",
    )
    privacy.add_argument(
        "--dp-clip-on",
        choices=("client", "server"),
        default="client",
        help="who clips: clients (works with secure aggregation) or the server (default %(default)s)",
    )
    privacy.add_argument("--dp-delta", type=float, default=1e-5, help="the delta epsilon is reported for")
    privacy.add_argument(
        "--dp-target-epsilon",
        type=float,
        default=None,
        metavar="EPS",
        help="end the run before a round would spend more than EPS",
    )
    secure = p.add_argument_group(
        "secure aggregation (the server sees only the sum; see fedgrpc.server.secagg)"
    )
    secure.add_argument(
        "--secagg", action="store_true", help="mask every update; the server unmasks only the round's sum"
    )
    secure.add_argument(
        "--secagg-bound",
        type=float,
        default=1.0,
        metavar="R",
        help="clip each weight's change to +-R before encoding (default %(default)s; under DP: --dp-clip)",
    )
    secure.add_argument(
        "--secagg-max-examples",
        type=int,
        default=100_000,
        metavar="N",
        help="the most examples one update is weighted by; sets the precision (default %(default)s)",
    )
    secure.add_argument(
        "--secagg-threshold",
        type=float,
        default=0.5,
        metavar="F",
        help="rebuild a client's secrets from more than F of its neighbours' shares (default %(default)s)",
    )
    secure.add_argument(
        "--secagg-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="how long each key step and the unmasking wait for clients (default %(default)s s)",
    )
    run.add_argument(
        "--client-sampling",
        choices=("fixed", "poisson"),
        default="fixed",
        help="with --clients-per-round K: K clients a round, or each with chance K/N (default %(default)s)",
    )

    evaluation = p.add_argument_group("evaluation")
    evaluation.add_argument(
        "--eval-every",
        type=int,
        default=None,
        metavar="N",
        help="federated evaluation (clients evaluate the global model on their own held-out data) after "
        "every Nth round and the last; 0: never (default: every round when the task gives the server "
        "no test set, else never)",
    )
    evaluation.add_argument(
        "--eval-fraction",
        type=float,
        default=1.0,
        help="share of the ready clients asked to evaluate (default %(default)s: all)",
    )
    evaluation.add_argument(
        "--personalize-epochs",
        type=int,
        default=0,
        metavar="N",
        help="clients also fine-tune N epochs on their own data (not sent back) and evaluate again",
    )

    policy = p.add_argument_group("rounds")
    policy.add_argument(
        "--min-clients",
        type=int,
        default=None,
        help="after --round-timeout, close a round with at least this many updates (default: all clients)",
    )
    policy.add_argument(
        "--round-timeout",
        type=float,
        default=None,
        help="seconds after which a round may close without every client (default: wait for all)",
    )
    policy.add_argument(
        "--join-timeout",
        type=float,
        default=120.0,
        help="seconds the first round waits for every client, then starts with --min-clients (default 120)",
    )
    policy.add_argument(
        "--finish-grace",
        type=float,
        default=15.0,
        metavar="S",
        help="at the end, how long to wait for every client to hear that the run finished (default 15)",
    )
    policy.add_argument(
        "--max-examples", type=int, default=10_000_000, help="largest example count an update may claim"
    )

    big = p.add_argument_group("big models, many clients")
    big.add_argument(
        "--chunk-kb", type=int, default=1024, help="size of the weight chunks sent down (default 1024 KiB)"
    )
    big.add_argument(
        "--max-inflight-mb",
        type=int,
        default=256,
        help="updates received at once, in MB: more wait their turn, bounding memory (default 256)",
    )
    big.add_argument(
        "--spool-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="stage updates being received on disk in DIR, not in memory: the server's memory then "
        "holds the global model, the running sum and one tensor per stream (for big models)",
    )

    limits = p.add_argument_group("limits (what one peer may hold; see fedgrpc.server.limits)")
    limits.add_argument(
        "--stall-timeout",
        type=float,
        default=limits_defaults.stall_timeout_s,
        metavar="S",
        help="cut a stream silent for S seconds: no header, no next chunk (default %(default)s)",
    )
    limits.add_argument(
        "--max-calls",
        type=int,
        default=None,
        metavar="N",
        help="calls open at once, all peers together (default: 4 per client of the run + 64, at least 8192)",
    )
    limits.add_argument(
        "--max-calls-per-peer",
        type=int,
        default=None,
        metavar="N",
        help="calls open at once from one network address (default: 4 per client of the run + 64)",
    )
    limits.add_argument(
        "--max-calls-per-client",
        type=int,
        default=limits_defaults.max_calls_per_client,
        metavar="N",
        help="long-polls, and update streams, one client id may hold open at once (default %(default)s)",
    )
    limits.add_argument(
        "--max-wait",
        type=float,
        default=limits_defaults.max_wait_s,
        metavar="S",
        help="longest hold of a long-poll before it answers WAIT (default %(default)s)",
    )
    limits.add_argument(
        "--inflight-wait",
        type=float,
        default=limits_defaults.inflight_wait_s,
        metavar="S",
        help="longest wait for room in --max-inflight-mb, then UNAVAILABLE (default %(default)s)",
    )

    security = p.add_argument_group("security")
    security.add_argument("--tls-cert", type=Path, help="server certificate (PEM)")
    security.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    security.add_argument(
        "--client-ca", type=Path, help="CA that signs client certificates: turns on mutual TLS"
    )
    security.add_argument(
        "--tokens", type=Path, help='per-client token digests, {"clients": {"1": "<sha256>"}}'
    )
    security.add_argument("--insecure", action="store_true", help="run without TLS (trusted networks only)")
    security.add_argument(
        "--hash-token", metavar="TOKEN", help="print the digest of TOKEN for a tokens file, and exit"
    )
    p.add_argument(
        "--record-updates", action="store_true", help="also save every accepted update (debugging)"
    )
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The flags, with a run file's [run] as their defaults, and the task parameters ([task],
    then every --param)."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    task_params: dict[str, Any] = {}
    if first.config is not None:
        settings, task_params = runfile.load(first.config)
        runfile.apply(parser, settings, first.config)
    args = parser.parse_args(argv)
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: write KEY=VALUE, e.g. --param learning_rate=0.01")
        task_params[key.strip()] = value
    return args, task_params


def security_from(args: argparse.Namespace) -> tuple[ServerTls | None, dict[int, str] | None]:
    """TLS and token settings from the flags, refusing combinations that would not be safe."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    tls = ServerTls(args.tls_cert, args.tls_key, args.client_ca) if args.tls_cert else None
    if args.client_ca and tls is None:
        raise ConfigError("--client-ca needs --tls-cert and --tls-key")
    if tls is None and not args.insecure:
        raise ConfigError(
            "no TLS: give --tls-cert and --tls-key, "
            "or pass --insecure to run without TLS on a network you trust"
        )
    tokens = load_tokens(args.tokens) if args.tokens else None
    return tls, tokens


def check_sizes(args: argparse.Namespace) -> None:
    if not 1 <= args.chunk_kb <= 8 << 10:
        raise ConfigError(f"--chunk-kb must be in 1..8192 (messages stay under 16 MiB), got {args.chunk_kb}")
    if args.max_inflight_mb < 1:
        raise ConfigError(f"--max-inflight-mb must be at least 1, got {args.max_inflight_mb}")
    if args.spool_dir is not None and not (args.spool_dir.is_dir() and os.access(args.spool_dir, os.W_OK)):
        raise ConfigError(f"--spool-dir {args.spool_dir} is not a writable directory; create it first")
    if args.clients_per_round is not None and not 1 <= args.clients_per_round <= args.clients:
        raise ConfigError(
            f"--clients-per-round must be in 1..--clients ({args.clients}), got {args.clients_per_round}"
        )


def privacy_from(args: argparse.Namespace) -> Any:
    from fedgrpc.server.app import PrivacySettings

    if args.dp_clip is None and args.dp_noise_multiplier is None:
        return None
    if args.dp_clip is None or args.dp_noise_multiplier is None:
        raise ConfigError("--dp-clip and --dp-noise-multiplier go together")
    return PrivacySettings(
        clip=args.dp_clip,
        noise_multiplier=args.dp_noise_multiplier,
        clip_on=args.dp_clip_on,
        delta=args.dp_delta,
        target_epsilon=args.dp_target_epsilon,
    )


def config_from(args: argparse.Namespace, task_params: dict[str, Any]) -> Any:
    from fedgrpc.server.app import RoundPolicy, ServerConfig

    tls, tokens = security_from(args)
    check_sizes(args)
    run = RunSpec(
        rounds=args.rounds,
        num_clients=args.clients,
        partition_seed=args.partition_seed,
        partition=args.partition,
        batch_size=args.batch_size,
        local_epochs=args.local_epochs,
        compression=args.compression,
        evaluation=EvaluationPlan(
            every=args.eval_every or 0,
            fraction=args.eval_fraction,
            personalize_epochs=args.personalize_epochs,
        ),
    )
    return ServerConfig(
        run=run,
        task=args.task,
        task_params=task_params,
        init_model=args.init_model,
        federated_eval=None if args.eval_every is None else args.eval_every > 0,
        host=args.host,
        port=args.port,
        data=args.data,
        out_dir=args.out,
        privacy=privacy_from(args),
        secagg=SecAggSpec(args.secagg_bound, args.secagg_max_examples, args.secagg_threshold)
        if args.secagg
        else None,
        secagg_timeout_s=args.secagg_timeout,
        client_sampling=args.client_sampling,
        strategy=StrategySettings(
            name=args.strategy,
            trim_fraction=args.trim_fraction,
            byzantine=args.byzantine,
            server_lr=args.server_lr,
            server_momentum=args.server_momentum,
            server_beta2=args.server_beta2,
            server_tau=args.server_tau,
            proximal_mu=args.proximal_mu,
        ),
        finish_grace_s=args.finish_grace,
        init_seed=args.init_seed,
        record_updates=args.record_updates,
        threads=args.threads,
        policy=RoundPolicy(
            min_clients=args.min_clients, timeout_s=args.round_timeout, join_timeout_s=args.join_timeout
        ),
        max_examples=args.max_examples,
        tls=tls,
        tokens=tokens,
        clients_per_round=args.clients_per_round,
        sample_seed=args.sample_seed,
        chunk_bytes=args.chunk_kb << 10,
        max_inflight_bytes=args.max_inflight_mb << 20,
        spool_dir=args.spool_dir,
        http=None
        if args.http is None
        else HttpConfig(port=args.http, host=args.http_host, linger_s=args.linger),
        tensorboard=args.tensorboard,
        health_port=args.health_port,
        limits=Limits(
            stall_timeout_s=args.stall_timeout,
            max_calls=args.max_calls,
            max_calls_per_peer=args.max_calls_per_peer,
            max_calls_per_client=args.max_calls_per_client,
            max_wait_s=args.max_wait,
            inflight_wait_s=args.inflight_wait,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    try:
        args, task_params = parse_args(argv)
    except FedGrpcError as exc:
        print(f"fl-server: error: {exc}", file=sys.stderr)
        return 2
    if args.hash_token:
        from fedgrpc.server.auth import hash_token

        print(hash_token(args.hash_token))
        return 0
    from fedgrpc.server.memory import limit_malloc_arenas

    limit_malloc_arenas()  # before TensorFlow and gRPC start their threads
    logs.setup("server", verbose=args.verbose, log_format=args.log_format)
    device.prepare(args.threads)
    from fedgrpc.server.app import FederatedServer

    try:
        server = FederatedServer(config_from(args, task_params))
        signal.signal(signal.SIGTERM, server.request_stop)
        signal.signal(signal.SIGINT, server.request_stop)
        server.run()
    except FedGrpcError as exc:
        print(f"fl-server: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
