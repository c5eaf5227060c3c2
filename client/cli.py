"""`fl-client`: one participant of a federated run.

Its settings are declared once here (SETTINGS, with the Setting machinery fl-server's use), read
as fl-server reads its own: flags over a run file's [run] over the environment ($FL_CLIENT_ID,
$FL_TASK, $FL_DATA, $FL_TOKEN) over defaults. Every refusal is a FedGrpcError, said in one line
(`fl-client: error: ...`) with exit status 2, as fl-server does; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..common import device, logs, run_file, settings
from ..common.errors import ConfigError
from ..common.settings import CHUNK_KB, CONFIG, DATA, LOG_FORMAT, TASK, VERBOSE, Setting, site_data
from ..common.words import plural
from .state import DEFAULT_STATE_DIR

if TYPE_CHECKING:
    from .app import LocalDP
    from .connection import ChannelSecurity
    from .policy import SitePolicy


_SECURITY = "security"
_CLIENT = "the client"
_LOCAL_DP = "local differential privacy (this client trusts nobody to add noise)"
_SITE = "site agent (fl-client --serve)"

#: fl-client's settings, declared as fl-server's are (fedgrpc.common.settings); group "" is the
#: essentials, listed first in --help.
SETTINGS = (
    replace(
        CONFIG,
        help="a run file: [run] holds any of these flags without dashes (server = \"host:port\", "
        "ca = \"ca.pem\", ...); flags given too override it",
    ),
    Setting(
        "client_id", int, None, low=1, env="FL_CLIENT_ID", flag_name="--id", metavar="N",
        help="this client's id, 1..N (trains shard id-1; default: $FL_CLIENT_ID, as a Kubernetes pod index)",
    ),
    Setting(
        "server", str, "localhost:50051", metavar="HOST:PORT",
        help="coordinator address host:port (default %(default)s)",
    ),
    replace(
        TASK,
        help="the task: a file (my_task.py), module:attribute, or an installed task's name; must be "
        "the server's (default: $FL_TASK, else %(default)s, the reference CIFAR-10 job)",
    ),
    replace(
        DATA,
        help="this site's data, as the task reads it; {id} in it becomes the client id "
        "(cifar10: a folder, .tar.gz or .npz; default: $FL_DATA, else CIFAR-10 from Keras)",
    ),
    Setting("insecure", bool, False, help="talk to the server without TLS (trusted networks only)"),
    Setting(
        "serve", bool, False, group=_SITE,
        help="stay up as a site agent: take part in run after run as --policy allows (docs/sites.md)",
    ),
    Setting(
        "policy", Path, None, metavar="SITE.toml", group=_SITE,
        help="the site's policy for --serve: its installed tasks, their data, its limits and privacy floor",
    ),
    Setting(
        "ca", Path, None, metavar="PEM",
        help="CA certificate that signed the server's certificate: turns on TLS",
    ),
    Setting("token", str, None, env="FL_TOKEN", help="this client's token ($FL_TOKEN)"),
    Setting(
        "connect_timeout", float, 60.0, above=0, group=_CLIENT, metavar="S",
        help="seconds to keep retrying an unreachable server (default %(default)s)",
    ),
    Setting(
        "threads", int, None, low=0, group=_CLIENT,
        help="cap the backend's CPU threads (e.g. cores / clients; 0 or unset: all cores)",
    ),
    Setting(
        "gpu", str, None, metavar="N[,M]", group=_CLIENT,
        help="use only these GPUs (sets CUDA_VISIBLE_DEVICES); several clients may share one",
    ),
    Setting(
        "take_turns", Path, None, metavar="LOCKFILE", group=_CLIENT,
        help="train only while holding an exclusive lock on LOCKFILE: clients sharing one machine take turns",
    ),
    replace(CHUNK_KB, group=_CLIENT, help="size of the update chunks sent up (default %(default)s KiB)"),
    Setting(
        "light", bool, False, group=_CLIENT,
        help="no TensorFlow, no data: send seeded perturbations of the global weights (benchmarks, tests)",
    ),
    Setting(
        "state_dir", str, DEFAULT_STATE_DIR, group=_CLIENT, metavar="DIR", env="FL_STATE_DIR",
        help="where this site keeps its state between rounds and restarts, a folder per run "
        "(SCAFFOLD's control variate; {id} becomes the client id; default $FL_STATE_DIR, else %(default)s)",
    ),
    replace(VERBOSE, group=_CLIENT),
    replace(LOG_FORMAT, group=_CLIENT),
    Setting(
        "local_dp_clip", float, None, above=0, metavar="C", group=_LOCAL_DP, help="clip each update to L2 C"
    ),
    Setting(
        "local_dp_noise_multiplier", float, None, low=0, metavar="Z", group=_LOCAL_DP,
        help="add Gaussian noise of std Z*C to each update before it leaves",
    ),
    Setting(
        "local_dp_delta", float, 1e-5, above=0, below=1, group=_LOCAL_DP,
        help="the delta epsilon is reported for",
    ),
    Setting(
        "tls_cert", Path, None, metavar="PEM", group=_SECURITY,
        help="this client's certificate, for mutual TLS",
    ),
    Setting(
        "tls_key", Path, None, metavar="PEM", group=_SECURITY,
        help="this client's private key, for mutual TLS",
    ),
    Setting(
        "tls_server_name", str, None, metavar="NAME", group=_SECURITY,
        help="name in the server's certificate, if not the host dialled",
    ),
    Setting(
        "token_file", Path, None, metavar="PATH", group=_SECURITY,
        help="read the token from this file; {id} in the path becomes the client id (a mounted "
        "Secret of many clients' tokens, e.g. /etc/fedgrpc/tokens/client-{id})",
    ),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """fl-client's flags, derived from their declarations (SETTINGS), shaped as fl-server's."""
    return settings.build_parser(
        SETTINGS,
        prog="fl-client",
        usage="%(prog)s [--config RUN.toml] --id N [--server HOST:PORT] [--task TASK] [--data DATA] "
        "[--insecure | --ca PEM] [more options, below]",
        description="Train on local data as one client of a federated run. Every flag but --config "
        "may also be set in a run file's [run] table, without its dashes.",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with a run file's [run] as their defaults; the task's parameters are the
    server's to send, so a client's run file has no [task]."""
    parser = build_parser()
    args, table = run_file.parse_with_run_file(parser, SETTINGS, argv)
    typed = settings.typed_flags(parser, argv) & {"task", "data"} if args.serve else set()
    if typed:
        flags = " and ".join(f"--{name}" for name in sorted(typed))
        raise ConfigError(f"--serve takes each task's file and data from --policy: drop {flags}")
    if table:
        raise ConfigError(
            f"--config {args.config}: a client's run file has no [task]; the task's parameters are "
            "the server's, sent to every client"
        )
    if args.client_id is None:
        raise ConfigError("which client is this? give --id N, or set $FL_CLIENT_ID")
    return args


def main(argv: list[str] | None = None) -> int:
    return settings.run_cli("fl-client", lambda: _run(parse_args(argv)))


def _run(args: argparse.Namespace) -> int:
    """Check the flags that go together, then take part; every refusal is a ConfigError."""
    logs.setup(f"client {args.client_id}", verbose=args.verbose, log_format=args.log_format)
    policy = _policy(args)  # checked before anything heavy is imported
    device.prepare(args.threads, args.gpu)
    from .app import ClientConfig, run_client

    security = _security(args)
    if args.light:
        if policy is not None:
            raise ConfigError(
                "--light sends made-up updates, so it cannot serve a site's tasks: drop --serve"
            )
        return _run_light(args, security)
    config = ClientConfig(
        client_id=args.client_id,
        server=args.server,
        task=args.task,
        data=site_data(args.data, args.client_id),
        connect_timeout_s=args.connect_timeout,
        threads=args.threads,
        turn_lock=args.take_turns,
        security=security,
        progress=sys.stdout.isatty(),
        chunk_bytes=args.chunk_kb << 10,
        local_dp=_local_dp(args),
        state_dir=args.state_dir,
    )
    if policy is not None:
        from .agent import serve

        serve(config, policy)
        return 0
    run_client(config)
    return 0


def _policy(args: argparse.Namespace) -> SitePolicy | None:
    """The site's policy with --serve (which needs one); --policy alone is refused."""
    if args.policy is not None and not args.serve:
        raise ConfigError("--policy is the policy of a site agent: add --serve, or drop --policy")
    if not args.serve:
        return None
    if args.policy is None:
        raise ConfigError("--serve needs the site's policy: give --policy site.toml (docs/sites.md)")
    from .policy import load_policy

    return load_policy(args.policy)


def _security(args: argparse.Namespace) -> ChannelSecurity:
    """TLS and the token, refusing plain text not asked for and half a client certificate."""
    from .connection import ChannelSecurity

    settings.require_tls(
        args.ca is not None,
        args.insecure,
        give="give --ca (the server's CA certificate)",
        without="pass --insecure to talk",
    )
    settings.go_together({"--tls-cert": args.tls_cert, "--tls-key": args.tls_key})
    if args.ca is None:
        logging.getLogger("fedgrpc.client").warning("INSECURE: talking to %s without TLS", args.server)
    token = args.token
    if args.token_file is not None:
        path = Path(str(args.token_file).replace("{id}", str(args.client_id)))
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {path}: {exc.strerror}") from None
    return ChannelSecurity(args.ca, args.tls_cert, args.tls_key, token, args.tls_server_name)


def _local_dp(args: argparse.Namespace) -> LocalDP | None:
    """Local DP when both --local-dp-clip and --local-dp-noise-multiplier are given."""
    clip, noise = args.local_dp_clip, args.local_dp_noise_multiplier
    settings.go_together({"--local-dp-clip": clip, "--local-dp-noise-multiplier": noise})
    if clip is None:
        return None
    from .app import LocalDP

    return LocalDP(clip, noise, args.local_dp_delta)


def _run_light(args: argparse.Namespace, security: ChannelSecurity) -> int:
    from .light import run_light_client

    stats = run_light_client(
        args.server,
        args.client_id,
        security=security,
        connect_timeout_s=args.connect_timeout,
        chunk_bytes=args.chunk_kb << 10,
    )
    logging.getLogger("fedgrpc.client").info("light client: %s submitted", plural(stats.rounds, "round"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
