"""fl-server's settings, each declared once (see fedgrpc.common.settings): its flag, its run-file
key, type, default, range and help. The parser, the run file's checks and the range checks
are derived from this table, and so are fedgrpc.server.config's defaults and ranges;
fedgrpc.server.cli turns the values into a ServerConfig.

To add a setting: add one `Setting(...)` to SETTINGS in the section it belongs to (its
`group`; group "" is the essentials, listed first in --help: keep it to about ten), a field
to ServerConfig (or the piece of it it belongs to) with `_default(name)`, and read
`args.<name>` where fedgrpc.server.cli builds that piece.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..common.settings import CHUNK_KB, CONFIG, DATA, LOG_FORMAT, ROUNDS, RUN_SETTINGS, VERBOSE, Setting
from .limits import Limits
from .staleness import MODES, STALENESS_WEIGHTS
from .strategy import STRATEGIES

_LIMITS = Limits()

GROUPS = {
    "the run": "the run",
    "task": "the task (see fedgrpc.common.task)",
    "server": "the server process",
    "watch": "watching the run",
    "strategy": "strategy (see fedgrpc.server.strategy, fedgrpc.server.fedopt; your own: docs/strategies.md)",
    "privacy": "differential privacy (DP-FedAvg; see fedgrpc.common.privacy)",
    "secagg": "secure aggregation (the server sees only the sum; see fedgrpc.server.secagg)",
    "evaluation": "evaluation",
    "rounds": "rounds",
    "fedbuff": "asynchronous rounds (--mode fedbuff: FedBuff, buffered asynchronous aggregation; "
    "see fedgrpc.server.buffered)",
    "big": "big models, many clients",
    "limits": "limits (what one peer may hold; see fedgrpc.server.limits)",
    "security": "security",
    "federation": "a standing federation (see docs/federation.md)",
}


SETTINGS: tuple[Setting, ...] = (
    # -- the essentials (group "": listed first in --help, the flags a newcomer needs)
    replace(
        CONFIG,
        help="a run file: [run] holds any of these flags without dashes, [task] the task's parameters; "
        "flags given too override it",
    ),
    *[
        replace(
            s,
            help="what the task's load_test_data reads, if it has one: the server's own test set "
            "(cifar10: a folder, .tar.gz or .npz; default $FL_DATA, else the Keras download)",
        )
        if s is DATA
        else replace(
            s,
            help="federated rounds; with --mode fedbuff, aggregations (model versions) (default %(default)s)",
        )
        if s is ROUNDS
        else s
        for s in RUN_SETTINGS
    ],
    Setting(
        "strategy",
        str,
        "fedavg",
        metavar="STRATEGY",
        maybe_path=True,
        help=f"aggregation: {', '.join(STRATEGIES)} (default %(default)s), or your own: a file "
        "(my_strategy.py), module:attribute, or an installed strategy's name (docs/strategies.md)",
    ),
    Setting("out", Path, Path("results"), metavar="DIR", help="folder for history, curves and model"),
    Setting(
        "port", int, 50051, low=0, high=65535, help="port to listen on; 0 picks a free one (default 50051)"
    ),
    Setting("insecure", bool, False, help="run without TLS (trusted networks only)"),
    Setting("tls_cert", Path, None, metavar="PEM", help="server certificate (PEM): turns on TLS"),
    Setting("tls_key", Path, None, metavar="PEM", help="server private key (PEM)"),
    # -- the task
    Setting(
        "param",
        str,
        None,
        group="task",
        repeat=True,
        in_file=False,
        metavar="KEY=VALUE",
        help="set one of the task's parameters (repeatable; overrides [task] of --config)",
    ),
    Setting(
        "init_model",
        Path,
        None,
        group="task",
        metavar="MODEL.keras|.npz",
        help="start from the weights of this saved Keras model (loaded in safe mode), or of an .npz "
        "of arrays (a framework-free task's final_weights.npz)",
    ),
    Setting("init_seed", int, 0, group="task", low=0, help="seed of the initial global weights"),
    # -- the run
    Setting("sample_seed", int, 0, group="the run", low=0, help="seed of the per-round client samples"),
    Setting(
        "client_sampling",
        str,
        "fixed",
        group="the run",
        choices=("fixed", "poisson"),
        help="with --clients-per-round K: K clients a round, or each with chance K/N (default %(default)s)",
    ),
    Setting(
        "federation",
        Path,
        None,
        group="federation",
        in_file=False,
        metavar="DIR",
        help="stay up and run the jobs admins submit (fl-job), one at a time; DIR keeps the queue and "
        "each job's outputs, and a restart with the same DIR resumes the running job",
    ),
    # -- the server process
    Setting("host", str, "[::]", group="server", help="address to bind (default: all interfaces)"),
    Setting(
        "threads",
        int,
        None,
        group="server",
        low=0,
        help="cap the CPU threads of evaluation (0 or unset: all cores)",
    ),
    replace(VERBOSE, group="server"),
    replace(LOG_FORMAT, group="server"),
    Setting(
        "record_updates", bool, False, group="server", help="also save every accepted update (debugging)"
    ),
    # -- watching the run
    Setting(
        "http",
        int,
        None,
        group="watch",
        low=0,
        high=65535,
        metavar="PORT",
        help="serve the live dashboard and Prometheus /metrics on PORT (read-only; 0 picks a free port)",
    ),
    Setting(
        "http_host",
        str,
        "127.0.0.1",
        group="watch",
        help="address of the dashboard (default 127.0.0.1: this machine only; it shows metadata, no data)",
    ),
    Setting(
        "linger",
        float,
        0.0,
        low=0.0,
        high=86400.0,
        group="watch",
        metavar="S",
        help="with --http: keep the dashboard and /metrics up S seconds after the run ends (default 0)",
    ),
    Setting(
        "health_port",
        int,
        None,
        low=0,
        high=65535,
        group="watch",
        metavar="PORT",
        help="also answer gRPC health checks, and only those, on PORT in plain text (probes that "
        "cannot speak TLS, such as Kubernetes'); same address as --host",
    ),
    Setting(
        "tensorboard",
        Path,
        None,
        group="watch",
        metavar="DIR",
        help="write TensorBoard scalars for every round to DIR",
    ),
    # -- strategy
    Setting(
        "server_lr",
        float,
        None,
        group="strategy",
        above=0,
        help="server optimizers' learning rate (fedavgm 0.1; fedadagrad, fedadam, fedyogi 0.01)",
    ),
    Setting(
        "server_momentum",
        float,
        None,
        group="strategy",
        low=0,
        below=1,
        help="fedavgm's momentum (0.9), or the adaptive family's beta1 (0.9)",
    ),
    Setting(
        "server_beta2", float, None, group="strategy", low=0, below=1, help="fedadam, fedyogi: beta2 (0.99)"
    ),
    Setting(
        "server_tau",
        float,
        None,
        group="strategy",
        above=0,
        help="fedadagrad, fedadam, fedyogi: adaptivity tau (1e-3)",
    ),
    Setting(
        "proximal_mu",
        float,
        None,
        group="strategy",
        low=0,
        metavar="MU",
        help="clients add MU/2 ||w - w_global||^2 to their loss (FedProx; default 0.01 with fedprox, else 0)",
    ),
    Setting(
        "trim_fraction",
        float,
        0.2,
        group="strategy",
        low=0,
        below=0.5,
        help="trimmed-mean: share cut from each end",
    ),
    Setting("byzantine", int, 1, group="strategy", low=0, help="krum: how many clients may be malicious"),
    # -- differential privacy
    Setting(
        "dp_clip", float, None, group="privacy", above=0, metavar="C", help="clip each update to L2 norm C"
    ),
    Setting(
        "dp_noise_multiplier",
        float,
        None,
        group="privacy",
        low=0,
        metavar="Z",
        help="add Gaussian noise of std Z*C to the sum of updates (each weighted 1, not by examples)",
    ),
    Setting(
        "dp_clip_on",
        str,
        "client",
        group="privacy",
        choices=("client", "server"),
        help="who clips: clients (works with secure aggregation) or the server (default %(default)s)",
    ),
    Setting(
        "dp_delta", float, 1e-5, group="privacy", above=0, below=1, help="the delta epsilon is reported for"
    ),
    Setting(
        "dp_target_epsilon",
        float,
        None,
        group="privacy",
        above=0,
        metavar="EPS",
        help="end the run before a round would spend more than EPS",
    ),
    # -- secure aggregation
    Setting(
        "secagg",
        bool,
        False,
        group="secagg",
        help="mask every update; the server unmasks only the round's sum",
    ),
    Setting(
        "secagg_bound",
        float,
        1.0,
        group="secagg",
        above=0,
        metavar="R",
        help="clip each weight's change to +-R before encoding (default %(default)s; under DP: --dp-clip)",
    ),
    Setting(
        "secagg_max_examples",
        int,
        100_000,
        group="secagg",
        low=1,
        metavar="N",
        help="the most examples one update is weighted by; sets the precision (default %(default)s)",
    ),
    Setting(
        "secagg_threshold",
        float,
        0.5,
        group="secagg",
        above=0,
        below=1,
        metavar="F",
        help="rebuild a client's secrets from more than F of its neighbours' shares (default %(default)s)",
    ),
    Setting(
        "secagg_timeout",
        float,
        60.0,
        group="secagg",
        above=0,
        metavar="S",
        help="how long each key step and the unmasking wait for clients (default %(default)s s)",
    ),
    # -- evaluation
    Setting(
        "eval_every",
        int,
        None,
        group="evaluation",
        low=0,
        metavar="N",
        help="federated evaluation (clients evaluate the global model on their own held-out data) after "
        "every Nth round and the last; 0: never (default: every round when the task gives the server "
        "no test set, else never)",
    ),
    Setting(
        "eval_fraction",
        float,
        1.0,
        group="evaluation",
        above=0,
        high=1,
        help="share of the ready clients asked to evaluate (default %(default)s: all)",
    ),
    Setting(
        "personalize_epochs",
        int,
        0,
        group="evaluation",
        low=0,
        metavar="N",
        help="clients also fine-tune N epochs on their own data (not sent back) and evaluate again",
    ),
    # -- rounds
    Setting(
        "min_clients",
        int,
        None,
        group="rounds",
        low=1,
        help="after --round-timeout, close a round with at least this many updates (default: all clients)",
    ),
    Setting(
        "round_timeout",
        float,
        None,
        group="rounds",
        above=0,
        help="seconds after which a round may close without every client (default: wait for all); "
        "with --mode fedbuff, after which a client still training no longer holds its slot",
    ),
    Setting(
        "join_timeout",
        float,
        120.0,
        group="rounds",
        above=0,
        help="seconds the first round waits for every client, then starts with --min-clients (default 120)",
    ),
    Setting(
        "finish_grace",
        float,
        15.0,
        group="rounds",
        low=0,
        metavar="S",
        help="at the end, how long to wait for every client to hear that the run finished (default 15)",
    ),
    Setting(
        "max_examples",
        int,
        10_000_000,
        group="rounds",
        low=1,
        help="largest example count an update may claim",
    ),
    # -- asynchronous rounds (FedBuff)
    Setting(
        "mode",
        str,
        "sync",
        group="fedbuff",
        choices=MODES,
        help="sync: rounds wait for their clients; fedbuff: clients train at their own pace and every "
        "--buffer-size updates make a new model version (default %(default)s)",
    ),
    Setting(
        "concurrency",
        int,
        None,
        group="fedbuff",
        low=1,
        metavar="C",
        help="fedbuff: clients training at once (default: every enrolled client)",
    ),
    Setting(
        "buffer_size",
        int,
        None,
        group="fedbuff",
        low=1,
        metavar="K",
        help="fedbuff: updates per aggregation, at most C (default: half of C, rounded up)",
    ),
    Setting(
        "staleness_weight",
        str,
        "sqrt",
        group="fedbuff",
        choices=STALENESS_WEIGHTS,
        help="fedbuff: an update s versions stale is weighted sqrt: 1/sqrt(1+s) (the paper's), "
        "constant: 1, polynomial: (1+s)^-A, hinge: 1 up to s = B, then 1/(1+A(s-B)) (default %(default)s)",
    ),
    Setting(
        "staleness_a",
        float,
        0.5,
        group="fedbuff",
        low=0,
        metavar="A",
        help="fedbuff: polynomial's exponent, hinge's slope (default %(default)s)",
    ),
    Setting(
        "staleness_b",
        int,
        4,
        group="fedbuff",
        low=0,
        metavar="B",
        help="fedbuff: hinge's knee, the staleness weighted in full (default %(default)s)",
    ),
    Setting(
        "max_staleness",
        int,
        10,
        group="fedbuff",
        low=0,
        metavar="S",
        help="fedbuff: refuse an update more than S versions stale (FAILED_PRECONDITION); the server "
        "keeps S+1 versions of the weights (default %(default)s)",
    ),
    # -- big models, many clients
    replace(CHUNK_KB, group="big", help="size of the weight chunks sent down (default %(default)s KiB)"),
    Setting(
        "max_inflight_mb",
        int,
        256,
        group="big",
        low=1,
        help="updates received at once, in MB: more wait their turn, bounding memory (default 256)",
    ),
    Setting(
        "spool_dir",
        Path,
        None,
        group="big",
        metavar="DIR",
        help="stage updates being received on disk in DIR, not in memory: the server's memory then "
        "holds the global model, the running sum and one tensor per stream (for big models)",
    ),
    # -- limits
    Setting(
        "stall_timeout",
        float,
        _LIMITS.stall_timeout_s,
        group="limits",
        above=0,
        metavar="S",
        help="cut a stream silent for S seconds: no header, no next chunk (default %(default)s)",
    ),
    Setting(
        "max_calls",
        int,
        None,
        group="limits",
        low=1,
        metavar="N",
        help="calls open at once, all peers together (default: 4 per client of the run + 64, at least 8192)",
    ),
    Setting(
        "max_calls_per_peer",
        int,
        None,
        group="limits",
        low=1,
        metavar="N",
        help="calls open at once from one network address (default: 4 per client of the run + 64)",
    ),
    Setting(
        "max_calls_per_client",
        int,
        _LIMITS.max_calls_per_client,
        group="limits",
        low=1,
        metavar="N",
        help="long-polls, and update streams, one client id may hold open at once (default %(default)s)",
    ),
    Setting(
        "max_wait",
        float,
        _LIMITS.max_wait_s,
        group="limits",
        above=0,
        metavar="S",
        help="longest hold of a long-poll before it answers WAIT (default %(default)s)",
    ),
    Setting(
        "checkin_rate",
        float,
        _LIMITS.checkin_rate,
        group="limits",
        above=0,
        metavar="N",
        help="with --clients-per-round, the clients not needed now are told to come back at about "
        "this many a second, holding no call meanwhile (default %(default)s)",
    ),
    Setting(
        "inflight_wait",
        float,
        _LIMITS.inflight_wait_s,
        group="limits",
        above=0,
        metavar="S",
        help="longest wait for room in --max-inflight-mb, then UNAVAILABLE (default %(default)s)",
    ),
    # -- security
    Setting(
        "client_ca",
        Path,
        None,
        group="security",
        help="CA that signs client certificates: turns on mutual TLS",
    ),
    Setting(
        "tokens",
        Path,
        None,
        group="security",
        help='per-client token digests, {"clients": {"1": "<sha256>"}}; re-read within 1 s of a change',
    ),
    Setting(
        "revoked",
        Path,
        None,
        group="security",
        metavar="FILE",
        help="refuse the client ids this file lists (fl-provision revoke); re-read within 1 s of a change",
    ),
    Setting(
        "admin_tokens",
        Path,
        None,
        group="federation",
        in_file=False,
        metavar="FILE",
        help='with --federation and no mutual TLS: admin token digests, {"admins": {"alice": "<sha256>"}}',
    ),
    Setting(
        "hash_token",
        str,
        None,
        group="security",
        in_file=False,
        metavar="TOKEN",
        help="print the digest of TOKEN for a tokens file, and exit",
    ),
)
