"""`fl-server`: the coordinator of a federated run.

Its settings are declared once in fedgrpc.server.flags; this module reads them (flags over a
run file over defaults), checks what joins several of them, and builds the ServerConfig
(fedgrpc.server.config), each of its pieces in one function. Every refusal is a FedGrpcError,
said in one line (`fl-server: error: ...`) with exit status 2, as fl-client does.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..common import device, logs, run_file, settings
from ..common.config import EvaluationPlan, RunSpec, SecAggSpec
from ..common.errors import ConfigError
from ..common.task_loader import ParamOverride
from .auth import ServerTls, TokenTable, load_tokens
from .config import FedBuffSettings, PrivacySettings, RoundPolicy, ServerConfig
from .flags import GROUPS, SETTINGS
from .http import HttpConfig
from .limits import Limits
from .round_settings import RoundSchedule, schedule_from_table
from .staleness import StalenessWeight
from .strategy import StrategySettings


def build_parser() -> argparse.ArgumentParser:
    """fl-server's flags, derived from their declarations (fedgrpc.server.flags)."""
    return settings.build_parser(
        SETTINGS,
        prog="fl-server",
        usage="%(prog)s [--config RUN.toml] [--task TASK] [--data DATA] [--rounds N] [--clients N] "
        "[--insecure | --tls-cert PEM --tls-key PEM] [more options, below]",
        description="Coordinate a federated learning run over gRPC. Every flag but --config, --param "
        "and --hash-token may also be set in a run file's [run] table, without its dashes.",
        groups=GROUPS,
    )


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The flags, with a run file's [run] as their defaults (so only a flag typed on the command
    line overrides the file), and the task parameters ([task], then every --param)."""
    args, table = run_file.parse_with_run_file(build_parser(), SETTINGS, argv)
    task_params: dict[str, Any] = {
        key: ParamOverride(value, f"{args.config}: [task] {key}") for key, value in table.items()
    }
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: write KEY=VALUE, e.g. --param learning_rate=0.01")
        task_params[key.strip()] = ParamOverride(value, f"--param {key.strip()}", text=True)
    return args, task_params


def security_from(args: argparse.Namespace) -> tuple[ServerTls | None, TokenTable | None]:
    """TLS and token settings from the flags, refusing combinations that would not be safe."""
    settings.go_together({"--tls-cert": args.tls_cert, "--tls-key": args.tls_key})
    tls = ServerTls(args.tls_cert, args.tls_key, args.client_ca) if args.tls_cert else None
    if args.client_ca and tls is None:
        raise ConfigError("--client-ca needs --tls-cert and --tls-key")
    settings.require_tls(
        tls is not None, args.insecure, give="give --tls-cert and --tls-key", without="pass --insecure to run"
    )
    tokens = load_tokens(args.tokens) if args.tokens else None
    if args.revoked and not (args.client_ca or tokens):
        raise ConfigError("--revoked refuses client identities: it needs --client-ca or --tokens")
    return tls, tokens


def check_sizes(args: argparse.Namespace) -> None:
    """The checks that look at the machine (each setting's own type and range were checked when
    it was read; what joins several is ServerConfig's to check)."""
    if args.spool_dir is not None and not (args.spool_dir.is_dir() and os.access(args.spool_dir, os.W_OK)):
        raise ConfigError(f"--spool-dir {args.spool_dir} is not a writable directory; create it first")


def check_watching(args: argparse.Namespace) -> None:
    """Flags that only mean something with the dashboard, refused without it (not ignored)."""
    if args.linger and args.http is None:
        raise ConfigError(
            "--linger keeps the dashboard up after the run, and there is none without --http: "
            "add --http PORT, or drop --linger"
        )


def run_spec_from(args: argparse.Namespace) -> RunSpec:
    """What every client must agree on, as far as the flags say (the server adds the task's
    identity and what the strategy and privacy settings ask of clients when it sets up)."""
    return RunSpec(
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


def privacy_from(args: argparse.Namespace) -> PrivacySettings | None:
    """Central DP when both --dp-clip and --dp-noise-multiplier are given (one alone is refused)."""
    settings.go_together({"--dp-clip": args.dp_clip, "--dp-noise-multiplier": args.dp_noise_multiplier})
    if args.dp_clip is None:
        return None
    return PrivacySettings(
        clip=args.dp_clip,
        noise_multiplier=args.dp_noise_multiplier,
        clip_on=args.dp_clip_on,
        delta=args.dp_delta,
        target_epsilon=args.dp_target_epsilon,
    )


def strategy_from(args: argparse.Namespace) -> StrategySettings:
    return StrategySettings(
        name=args.strategy,
        trim_fraction=args.trim_fraction,
        byzantine=args.byzantine,
        server_lr=args.server_lr,
        server_momentum=args.server_momentum,
        server_beta2=args.server_beta2,
        server_tau=args.server_tau,
        proximal_mu=args.proximal_mu,
    )


def fedbuff_from(args: argparse.Namespace) -> FedBuffSettings | None:
    """--mode fedbuff's settings; their flags are refused in sync mode, not ignored."""
    if args.mode == "fedbuff":
        return FedBuffSettings(
            concurrency=args.concurrency,
            buffer_size=args.buffer_size,
            weight=StalenessWeight(args.staleness_weight, args.staleness_a, args.staleness_b),
            max_staleness=args.max_staleness,
        )
    given = [
        flag
        for flag, value in (("--concurrency", args.concurrency), ("--buffer-size", args.buffer_size))
        if value is not None
    ]
    if given:
        raise ConfigError(f"{', '.join(given)} belong to --mode fedbuff; add --mode fedbuff, or drop them")
    return None


def limits_from(args: argparse.Namespace) -> Limits:
    return Limits(
        stall_timeout_s=args.stall_timeout,
        max_calls=args.max_calls,
        max_calls_per_peer=args.max_calls_per_peer,
        max_calls_per_client=args.max_calls_per_client,
        max_wait_s=args.max_wait,
        checkin_rate=args.checkin_rate,
        inflight_wait_s=args.inflight_wait,
    )


def http_from(args: argparse.Namespace) -> HttpConfig | None:
    """The dashboard, with --http (check_watching refuses its other flags without it)."""
    if args.http is None:
        return None
    return HttpConfig(port=args.http, host=args.http_host, linger_s=args.linger)


def config_from(args: argparse.Namespace, task_params: Mapping[str, Any]) -> ServerConfig:
    """The run's ServerConfig from the flags: each piece built once, from its settings."""
    check_watching(args)
    strategy = strategy_from(args)  # before TLS: a strategy that does not exist is the first thing to say
    tls, tokens = security_from(args)
    check_sizes(args)
    return ServerConfig(
        run=run_spec_from(args),
        task=args.task,
        task_params=task_params,
        init_model=args.init_model,
        federated_eval=None if args.eval_every is None else args.eval_every > 0,
        host=args.host,
        port=args.port,
        data=args.data,
        out_dir=args.out,
        strategy=strategy,
        privacy=privacy_from(args),
        secagg=SecAggSpec(args.secagg_bound, args.secagg_max_examples, args.secagg_threshold)
        if args.secagg
        else None,
        secagg_timeout_s=args.secagg_timeout,
        client_sampling=args.client_sampling,
        tls=tls,
        tokens=tokens,
        revoked=args.revoked,
        init_seed=args.init_seed,
        policy=RoundPolicy(
            min_clients=args.min_clients, timeout_s=args.round_timeout, join_timeout_s=args.join_timeout
        ),
        max_examples=args.max_examples,
        limits=limits_from(args),
        finish_grace_s=args.finish_grace,
        record_updates=args.record_updates,
        threads=args.threads,
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
        fedbuff=fedbuff_from(args),
        round_schedule=round_schedule_from(args.config),
    )


def round_schedule_from(config: Path | None) -> RoundSchedule:
    """The run file's [rounds]: each round's client settings (fedgrpc.server.round_settings)."""
    if config is None:
        return RoundSchedule()
    return schedule_from_table(run_file.read_rounds_table(config), str(config))


def main(argv: list[str] | None = None) -> int:
    return settings.run_cli("fl-server", lambda: _serve(argv))


def _serve(argv: list[str] | None) -> int:
    args, task_params = parse_args(argv)
    if args.hash_token:
        from .auth import hash_token

        print(hash_token(args.hash_token))
        return 0
    from .memory import limit_malloc_arenas

    limit_malloc_arenas()  # before TensorFlow and gRPC start their threads
    logs.setup("server", verbose=args.verbose, log_format=args.log_format)
    device.prepare(args.threads)
    if args.federation is not None:
        from .federation import Federation

        federation = Federation(args, sys.argv[1:] if argv is None else argv)
        signal.signal(signal.SIGTERM, federation.request_stop)
        signal.signal(signal.SIGINT, federation.request_stop)
        federation.run()
        return 0
    from .app import FederatedServer

    server = FederatedServer(config_from(args, task_params))
    signal.signal(signal.SIGTERM, server.request_stop)
    signal.signal(signal.SIGINT, server.request_stop)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
