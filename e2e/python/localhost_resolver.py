"""Makes every `*.localhost` name resolve to 127.0.0.1, for virtual-hosted S3 tests.

Virtual-hosted S3 addresses a bucket as the host `<bucket>.<s3 domain>`; Karri's gateway serves
the S3 domain `localhost`, but this machine's resolver answers only `localhost` itself, not its
subdomains. The S3 tests therefore patch `socket.getaddrinfo`, the one function urllib3 (boto3,
awscli) and http.client (s3cmd) resolve host names with, so that `*.localhost` is 127.0.0.1 in
the patched process. Only the address lookup changes: the clients still send `Host:
<bucket>.localhost:<port>`, use that name for TLS SNI and verify the certificate against it.

In-process (boto3):

    import localhost_resolver
    localhost_resolver.install()

As a wrapper around another Python program (awscli, s3cmd), which then runs in this process with
`sys.argv` = `[program, args...]`:

    .venv/bin/python e2e/python/localhost_resolver.py .venv/bin/aws s3api list-buckets
    .venv/bin/python e2e/python/localhost_resolver.py .venv/bin/s3cmd -c s3cfg ls
"""

import runpy
import socket
import sys

LOOPBACK = "127.0.0.1"

_real_getaddrinfo = socket.getaddrinfo


def is_localhost_subdomain(host):
    """Whether `host` (str or bytes) is a name under `localhost.` (RFC 6761 reserves them all)."""
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    return host.lower().rstrip(".").endswith(".localhost")


def _getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    if is_localhost_subdomain(host):
        # The gateway listens on IPv4 loopback only: answer 127.0.0.1 whatever family was asked.
        return _real_getaddrinfo(LOOPBACK, port, socket.AF_INET, type, proto, flags)
    return _real_getaddrinfo(host, port, family, type, proto, flags)


def install():
    """Patches `socket.getaddrinfo` in this process (idempotent)."""
    socket.getaddrinfo = _getaddrinfo


def main():
    if len(sys.argv) < 2:
        print(f"usage: {sys.argv[0]} <python program> [args...]", file=sys.stderr)
        return 2
    install()
    program = sys.argv[1]
    sys.argv = sys.argv[1:]
    # The program's own `sys.exit(...)` ends the process with its status.
    runpy.run_path(program, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
