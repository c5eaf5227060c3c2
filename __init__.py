"""The project root stands for the fedgrpc package.

common/, server/ and client/ install as fedgrpc.common, fedgrpc.server and fedgrpc.client (the
package-dir table in pyproject.toml) and import each other relatively (`from ..common import
wire`). This file marks the root as their parent package for tools that read the tree rather than
the installed package, so those imports resolve by path. It is never installed.

pytest imports it too (it collects the root as a package). In a checkout folder named fedgrpc that
makes the root the `fedgrpc` package for the session, so it mirrors the installed layout: the
generated bindings, installed as fedgrpc.v1, live in proto/fedgrpc/v1.
"""

import os as _os

__path__.append(_os.path.join(_os.path.dirname(__file__), "proto", "fedgrpc"))  # type: ignore[name-defined]  # noqa: F821
