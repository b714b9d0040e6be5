"""Runs HAProxy on a hardened copy of the configuration Ray Serve writes for it.

Ray Serve's HAProxy template puts the stats page and the Prometheus exporter on every
interface (``bind *:8404``, ``bind :9101``), shares one ``maxconn`` between them and the app's
own listener, sets no ``timeout http-request`` (a client may hold a half-sent request for
the hour of ``timeout client``) and opens its admin socket ``mode 666 level admin``. Its
template has no setting for any of these; it does run the HAProxy binary that
``RAY_SERVE_HAPROXY_BINARY_PATH`` names. ``serve/runtime.py`` points that at a shim which
runs this file: it rewrites the ``-f`` config and execs the real HAProxy
(``$CIR_BENCH_HAPROXY_BINARY``) with the same arguments.

Standard library only, and nothing imported from cir-bench: HAProxy (re)starts run it.
"""
from __future__ import annotations

import os
import re
import sys

SIDE_HOST = "127.0.0.1"
SIDE_MAXCONN = 64  # per side listener: they cannot use up the app's share of the global maxconn
HTTP_REQUEST_TIMEOUT = "10s"  # a client gets this long to send a request's headers (and body start)


def harden(text: str) -> str:
    """The configuration with every listener that names no address (Ray's side listeners) on
    loopback with its own connection limit, a ``timeout http-request`` in ``defaults`` that
    also covers the body (``option http-buffer-request``), and the admin socket readable by
    its owner only.

    >>> cfg = ("global\\n    stats socket /p/admin.sock mode 666 level admin\\ndefaults\\n    mode http\\n"
    ...        "frontend prometheus\\n    bind :9101\\nfrontend http_frontend\\n    bind 127.0.0.1:8000\\n"
    ...        "listen stats\\n  bind *:8404\\n")
    >>> print(harden(cfg), end="")
    global
        stats socket /p/admin.sock mode 600 level admin
    defaults
        timeout http-request 10s
        option http-buffer-request
        mode http
    frontend prometheus
        bind 127.0.0.1:9101
        maxconn 64
    frontend http_frontend
        bind 127.0.0.1:8000
    listen stats
      bind 127.0.0.1:8404
      maxconn 64
    """
    out = []
    for line in text.splitlines():
        side = re.match(r"(\s*)bind\s+\*?:(\d+)(.*)$", line)
        if side:
            indent, port, rest = side.groups()
            out += [f"{indent}bind {SIDE_HOST}:{port}{rest}", f"{indent}maxconn {SIDE_MAXCONN}"]
            continue
        out.append(re.sub(r"^(\s*stats socket \S+ mode )\d+", r"\g<1>600", line))
        if line.strip() == "defaults" and "timeout http-request" not in text:
            # with the body buffered (its first tune.bufsize bytes) the timeout covers the body
            # too: a client sending a byte a second is dropped as well
            out += [f"    timeout http-request {HTTP_REQUEST_TIMEOUT}", "    option http-buffer-request"]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> None:
    real = os.environ["CIR_BENCH_HAPROXY_BINARY"]
    args = list(argv)
    if "-f" in args[:-1]:
        at = args.index("-f") + 1
        with open(args[at], encoding="utf-8") as f:
            text = f.read()
        hardened = args[at] + ".hardened"
        with open(hardened + ".tmp", "w", encoding="utf-8") as f:
            f.write(harden(text))
        os.replace(hardened + ".tmp", hardened)
        args[at] = hardened
    os.execv(real, [real, *args])


if __name__ == "__main__":
    main(sys.argv[1:])
