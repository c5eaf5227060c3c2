"""fl-server's flag checks: a wrong size or path is a clear ConfigError before anything starts."""

from pathlib import Path

import pytest
from fedgrpc.common.errors import ConfigError
from fedgrpc.server.cli import check_sizes, parse_args


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--chunk-kb", "0"], "--chunk-kb must be in 1..8192"),
        (["--max-inflight-mb", "0"], "--max-inflight-mb must be at least 1"),
        (["--clients", "3", "--clients-per-round", "4"], "--clients-per-round must be in 1..--clients"),
        (["--spool-dir", "/nonexistent/spool"], "is not a writable directory"),
    ],
)
def test_bad_sizes_and_paths_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_sizes(parse_args(flags)[0])


def test_a_writable_spool_dir_is_taken(tmp_path: Path) -> None:
    args, _ = parse_args(["--spool-dir", str(tmp_path)])
    check_sizes(args)
    assert args.spool_dir == tmp_path
