"""S3 compatibility of a Karri gateway, checked with the real boto3, awscli, s3cmd and curl.

Run by `e2e/tests/s3_compat.rs` as `.venv/bin/python e2e/python/s3_compat.py [GROUP ...]` (no
argument: every group, in order; `--list` prints the groups) with this environment:

  AWS_ENDPOINT_URL              the gateway, `https://127.0.0.1:<port>`: path-style S3 at `/` and
                                under `/services/objectstorage`
  AWS_CA_BUNDLE                 the CA certificate that signed the gateway's serving certificate
  AWS_ACCESS_KEY_ID             account A's access key (A owns most buckets of a run)
  AWS_SECRET_ACCESS_KEY
  KARRI_S3_B_ACCESS_KEY_ID      account B's access key: another tenant, for isolation and ACLs
  KARRI_S3_B_SECRET_ACCESS_KEY
  AWS_DEFAULT_REGION            optional, `karri-1` by default
  KARRI_S3_DOMAIN               optional, the S3 domain of virtual-hosted buckets
                                (`<bucket>.<domain>:<port>`), `s3.localhost` by default: the
                                gateway serves `localhost` too, but OpenSSL (Python, curl)
                                never matches a one-label wildcard such as `*.localhost`
  AWS_CONFIG_FILE, AWS_SHARED_CREDENTIALS_FILE
                                should name files that do not exist, so that nothing of this
                                machine's AWS configuration is read (`Gateway::aws_env` does so)

By hand against `make up` (account A from karri.env, B any other account's access key):

  . .state/karri.env
  KARRI_S3_B_ACCESS_KEY_ID=... KARRI_S3_B_SECRET_ACCESS_KEY=... \
      .venv/bin/python e2e/python/s3_compat.py [GROUP ...]

Prints one line per check, `ok <group>.<check>` or `FAIL <group>.<check>: <reason>`, and
`skip <group>.<check>: ...` for a check not run because a check it needs failed; then
`passed: P, failed: F, skipped: S` and the time taken. Exits 0 only when nothing failed or was
skipped. A failing check does not stop the run: only the checks of its group that need it are
skipped. Every bucket of a run is named `<random prefix>-<name>`, and the last group (`cleanup`)
deletes the run's buckets of both accounts, checking that it can.

The clients: boto3 in this process (one attempt per call, never a retry that could hide an
error), the awscli and s3cmd of this virtualenv as subprocesses, curl for presigned URLs and
anonymous requests. Virtual-hosted requests go to `<bucket>.<domain>`: `localhost_resolver`
makes those names resolve to 127.0.0.1 (in this process for boto3, as a wrapper around awscli and
s3cmd; curl gets `--resolve`). Request signatures that no client makes on its own (signed
`aws-chunked` chunks, a body that does not match its signed SHA-256) are made here with SigV4
(checked against AWS's published example first) and sent with http.client.
"""

import base64
import datetime
import gzip
import hashlib
import hmac
import http.client
import json
import os
import re
import secrets
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections import namedtuple
from unittest import mock
from urllib.parse import quote, unquote_plus, urlsplit

import boto3
import botocore.auth
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionClosedError

import localhost_resolver

HERE = os.path.dirname(os.path.abspath(__file__))
RESOLVER = os.path.join(HERE, "localhost_resolver.py")
BIN = os.path.dirname(sys.executable)
AWS_CLI = os.path.join(BIN, "aws")
S3CMD = os.path.join(BIN, "s3cmd")

Keys = namedtuple("Keys", "access_key secret_key")
Reply = namedtuple("Reply", "status headers body")

KIB = 1024
MIB = 1024 * KIB
UTC = datetime.timezone.utc
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
STREAMING = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"
AUTHENTICATED_USERS = "http://acs.amazonaws.com/groups/global/AuthenticatedUsers"
# The grants of each canned ACL, as `grants_of` normalises them.
CANNED_GRANTS = {
    "private": {("owner", "FULL_CONTROL")},
    "public-read": {("owner", "FULL_CONTROL"), ("AllUsers", "READ")},
    "public-read-write": {("owner", "FULL_CONTROL"), ("AllUsers", "READ"), ("AllUsers", "WRITE")},
    "authenticated-read": {("owner", "FULL_CONTROL"), ("AuthenticatedUsers", "READ")},
}

# Set by `configure()` from the environment.
ENDPOINT = CA = REGION = DOMAIN = HOST = None
PORT = 0
A = B = None
PREFIX = ""
VHOST_ENDPOINT = EUCA_ENDPOINT = None
TMP = None
AWS_CONFIG_PATH = AWS_CONFIG_VIRTUAL = None
# The canonical user ID of each account (`owners` group): "A", "B".
OWNER = {}
# Operations boto3 sent a second time because the connection closed before an answer.
RESENT = []


# --- checks ---------------------------------------------------------------------------------


class Failure(Exception):
    """A check that did not hold."""


def check(condition, message):
    if not condition:
        raise Failure(message)


def describe(e):
    """One line about why a check failed."""
    if isinstance(e, Failure):
        return str(e)
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        meta = e.response.get("ResponseMetadata", {})
        return (
            f"unexpected S3 error {err.get('Code')} (HTTP {meta.get('HTTPStatusCode')}) "
            f"from {e.operation_name}: {err.get('Message')}{where(e)}"
        )
    if isinstance(e, BotoCoreError):
        return f"the request got no S3 answer: {type(e).__name__}: {e}{where(e)}"
    if isinstance(e, subprocess.TimeoutExpired):
        return f"{' '.join(map(str, e.cmd))} did not finish within {e.timeout} s"
    return f"{type(e).__name__}: {e}{where(e)}"


def where(e):
    """` (s3_compat.py line N)`: the last line of this script the exception passed through."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == __file__]
    return f" (s3_compat.py line {frames[-1].lineno})" if frames else ""


class Suite:
    def __init__(self):
        self.passed = 0
        self.failed = 0
        self.skipped = 0

    def group(self, name):
        return Group(self, name)


class Group:
    """Named checks run as they are declared: `@g.check("name")` over a function runs it now.

    A failed `setup` check skips the rest of its group (they need what it made); a failed
    `check` is reported and the group goes on.
    """

    def __init__(self, suite, name):
        self.suite = suite
        self.name = name
        self.broken = None

    def setup(self, name):
        return lambda fn: self._run(name, fn, essential=True)

    def check(self, name):
        return lambda fn: self._run(name, fn, essential=False)

    def _run(self, name, fn, essential):
        full = f"{self.name}.{name}"
        if self.broken:
            self.suite.skipped += 1
            print(f"skip {full}: needs {self.broken}, which failed", flush=True)
            return None
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported under its check's name
            self.suite.failed += 1
            print(f"FAIL {full}: {describe(e)}", flush=True)
            if essential:
                self.broken = full
            return None
        self.suite.passed += 1
        print(f"ok {full}", flush=True)
        return result


# --- small helpers --------------------------------------------------------------------------


def md5hex(data):
    return hashlib.md5(data).hexdigest()


def sha256hex(data):
    return hashlib.sha256(data).hexdigest()


def etag_of(data):
    """The ETag S3 gives an object stored by one PUT: the MD5 of its bytes, quoted."""
    return f'"{md5hex(data)}"'


def multipart_etag(parts):
    """The ETag of a completed multipart upload: MD5 of the parts' MD5s, `-<part count>`."""
    digest = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    return f'"{digest}-{len(parts)}"'


def b64md5(data):
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def brief(value, limit=300):
    """A short repr of call parameters or an answer (no bodies, no response metadata)."""
    if isinstance(value, dict):
        value = {
            k: (f"<{len(v)} bytes>" if isinstance(v, (bytes, bytearray)) else v)
            for k, v in value.items()
            if k not in ("ResponseMetadata", "Body")
        }
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def call_text(call, args, params):
    """`name(params)` of a call, for messages."""
    shown = brief(params) if params else (brief(args) if args else "")
    return f"{call.__name__}({shown})"


def status(answer):
    return answer["ResponseMetadata"]["HTTPStatusCode"]


def header(answer, name):
    """A response header of a boto3 answer (case-insensitive), or None."""
    headers = answer["ResponseMetadata"].get("HTTPHeaders", {})
    return {k.lower(): v for k, v in headers.items()}.get(name.lower())


def keys_of(answer):
    return [o["Key"] for o in answer.get("Contents", [])]


def prefixes_of(answer):
    return [p["Prefix"] for p in answer.get("CommonPrefixes", [])]


def utf8_sorted(keys):
    """Keys in S3's listing order: by their UTF-8 bytes."""
    return sorted(keys, key=lambda k: k.encode())


def bucket(name):
    """The run's bucket `name`."""
    return f"{PREFIX}-{name}"


def location():
    return {"LocationConstraint": REGION}


def make_bucket(client, name, acl=None):
    params = {"Bucket": name, "CreateBucketConfiguration": location()}
    if acl:
        params["ACL"] = acl
    answer = client.create_bucket(**params)
    check(status(answer) == 200, f"create_bucket {name} answered HTTP {status(answer)}")
    return answer


def clock(skew_seconds):
    """A patch of the clock botocore's signers read, `skew_seconds` away from now."""
    moved = datetime.datetime.now(UTC).replace(tzinfo=None) + datetime.timedelta(
        seconds=skew_seconds
    )
    return mock.patch.object(botocore.auth, "get_current_datetime", lambda *a, **k: moved)


def tail(text, lines=25):
    return "\n".join(text.strip().splitlines()[-lines:])


def xml_code(body):
    """The `<Code>` of an S3 error document, or None."""
    found = re.search(rb"<Code>([^<]*)</Code>", body or b"")
    return found.group(1).decode() if found else None


# --- boto3 ----------------------------------------------------------------------------------

_clients = {}


def resend_once_when_closed(attempts, caught_exception, operation, **_):
    """botocore `needs-retry` handler: send again (at once) a request whose kept-alive
    connection was closed before any answer came, once. Nothing else is ever retried (the
    clients have total_max_attempts 1); the run reports how often this happened."""
    if attempts == 1 and isinstance(caught_exception, ConnectionClosedError):
        RESENT.append(operation.name)
        return 0
    return None


def s3(keys=None, style="path", endpoint=None, anonymous=False, checksums="when_supported"):
    """A boto3 S3 client (cached) signing with `keys` (account A by default).

    `style`: "path" or "virtual" addressing (virtual needs `endpoint=VHOST_ENDPOINT`: botocore
    never puts a bucket in front of an IP address). `anonymous`: unsigned requests.
    `checksums`: botocore's request_checksum_calculation. "when_supported" (its default) sends
    every PutObject/UploadPart body `aws-chunked` with a CRC32 trailer
    (STREAMING-UNSIGNED-PAYLOAD-TRAILER); "when_required" sends plain bodies whose SHA-256 is
    signed, or UNSIGNED-PAYLOAD when a Content-MD5 is given.

    Each client records `(method, url, headers)` of the requests it sends in `client.sent`.
    """
    keys = keys or A
    cache_key = (keys, style, endpoint, anonymous, checksums)
    client = _clients.get(cache_key)
    if client is None:
        config = Config(
            region_name=REGION,
            signature_version=UNSIGNED if anonymous else "s3v4",
            retries={"total_max_attempts": 1},
            connect_timeout=10,
            read_timeout=120,
            s3={"addressing_style": style},
            request_checksum_calculation=checksums,
        )
        session = boto3.session.Session(
            aws_access_key_id=keys.access_key,
            aws_secret_access_key=keys.secret_key,
            region_name=REGION,
        )
        client = session.client("s3", endpoint_url=endpoint or ENDPOINT, verify=CA, config=config)
        sent = []

        def record(request, **_):
            headers = {
                k.lower(): v.decode("latin-1") if isinstance(v, bytes) else v
                for k, v in request.headers.items()
            }
            sent.append((request.method, request.url, headers))
            del sent[:-20]

        client.meta.events.register("before-send.s3", record)
        client.meta.events.register_first("needs-retry.s3", resend_once_when_closed)
        client.sent = sent
        _clients[cache_key] = client
    return client


def last_sent(client):
    check(client.sent, "the client sent no request")
    return client.sent[-1]


def error_of(call, *args, **params):
    """Calls `call(*args, **params)`, which must fail with an S3 error: (code, HTTP status,
    error)."""
    try:
        answer = call(*args, **params)
    except ClientError as e:
        return (
            e.response.get("Error", {}).get("Code"),
            e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
            e,
        )
    raise Failure(
        f"{call_text(call, args, params)} succeeded, an error was expected; "
        f"it answered {brief(answer)}"
    )


def expect_error(code, http_status, call, *args, **params):
    """`call(*args, **params)` must fail with S3 error `code` and HTTP status `http_status`.

    HEAD answers have no body: their code is the status (botocore names it "404", "403" ...).
    """
    got, got_status, e = error_of(call, *args, **params)
    check(
        got == code and got_status == http_status,
        f"{call_text(call, args, params)} failed with {got} (HTTP {got_status}), "
        f"expected {code} (HTTP {http_status}): {e}",
    )
    # Every error document says what went wrong (a HEAD answer has no document).
    if not call.__name__.startswith("head_"):
        check(e.response.get("Error", {}).get("Message"),
              f"{call_text(call, args, params)} failed with {got} without a message: {e.response}")
    return e


def not_modified(call, etag, **params):
    """`call(**params)` must answer 304 Not Modified with the object's validators (RFC 9110
    section 15.4.5: the ETag and Last-Modified a 200 would have had) and no body."""
    e = expect_error("304", 304, call, **params)
    headers = e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    check(headers.get("etag") == etag and headers.get("last-modified"),
          f"{call_text(call, (), params)}: a 304 without the validators: {headers}")
    check(headers.get("content-length", "0") == "0",
          f"{call_text(call, (), params)}: a 304 with a body: {headers}")


def denied(call, **params):
    """`call(**params)` must be refused with AccessDenied (403)."""
    if call.__name__.startswith("head_"):
        return expect_error("403", 403, call, **params)
    return expect_error("AccessDenied", 403, call, **params)


def allowed(call, **params):
    """`call(**params)` must succeed (a refusal names the call)."""
    try:
        return call(**params)
    except ClientError as e:
        err = e.response.get("Error", {})
        raise Failure(
            f"{call.__name__}({brief(params)}) was refused with {err.get('Code')} "
            f"(HTTP {e.response.get('ResponseMetadata', {}).get('HTTPStatusCode')}), "
            f"it should be allowed: {err.get('Message')}"
        )


def body_of(client, bucket_name, key, **params):
    return client.get_object(Bucket=bucket_name, Key=key, **params)["Body"].read()


def exists(client, bucket_name, key):
    try:
        client.head_object(Bucket=bucket_name, Key=key)
        return True
    except ClientError as e:
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return False
        raise


def grants_of(acl, owner_id):
    """The grants of an ACL answer as {(grantee, permission)}: grantee "owner" for the owner's
    canonical ID, "AllUsers"/"AuthenticatedUsers" for those groups, else the ID or URI."""
    out = set()
    for grant in acl.get("Grants", []):
        grantee = grant.get("Grantee", {})
        if grantee.get("Type") == "Group":
            who = grantee.get("URI", "").rsplit("/", 1)[-1]
        elif grantee.get("ID") and grantee.get("ID") == owner_id:
            who = "owner"
        else:
            who = grantee.get("ID") or grantee.get("URI") or grantee.get("EmailAddress")
        out.add((who, grant.get("Permission")))
    return out


def check_acl(answer, canned, what):
    owner = answer.get("Owner", {}).get("ID")
    check(owner == OWNER.get("A"), f"{what}: ACL owner {owner!r}, expected A's {OWNER.get('A')!r}")
    got = grants_of(answer, owner)
    check(got == CANNED_GRANTS[canned], f"{what}: grants {sorted(got)}, {canned} is "
          f"{sorted(CANNED_GRANTS[canned])}")


# --- SigV4 made here (for what no client sends on its own) ---------------------------------


def _hmac(key, message):
    return hmac.new(key, message.encode() if isinstance(message, str) else message,
                    hashlib.sha256)


def sign(keys, method, path, query, headers, payload_hash, amz_date, region):
    """SigV4 of a request whose headers (lower-case names, `host` included) are all signed:
    (Authorization value, signature, credential scope, signing key)."""
    names = sorted(headers)
    canonical = "\n".join([
        method,
        path,
        query,
        "".join(f"{n}:{' '.join(str(headers[n]).split())}\n" for n in names),
        ";".join(names),
        payload_hash,
    ])
    scope = f"{amz_date[:8]}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, sha256hex(canonical.encode())])
    key = ("AWS4" + keys.secret_key).encode()
    for part in (amz_date[:8], region, "s3", "aws4_request"):
        key = _hmac(key, part).digest()
    signature = _hmac(key, to_sign).hexdigest()
    authorization = (
        f"AWS4-HMAC-SHA256 Credential={keys.access_key}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return authorization, signature, scope, key


def chunk_signatures(key, amz_date, scope, seed, chunks):
    """The signature of each chunk of STREAMING-AWS4-HMAC-SHA256-PAYLOAD (the final empty
    chunk included), each chained to the previous one from the seed signature."""
    signatures, previous = [], seed
    for chunk in list(chunks) + [b""]:
        to_sign = "\n".join([
            "AWS4-HMAC-SHA256-PAYLOAD", amz_date, scope, previous, EMPTY_SHA256, sha256hex(chunk)
        ])
        previous = _hmac(key, to_sign).hexdigest()
        signatures.append(previous)
    return signatures


def chunked_body(chunks, signatures):
    return b"".join(
        f"{len(c):x};chunk-signature={s}\r\n".encode() + c + b"\r\n"
        for c, s in zip(list(chunks) + [b""], signatures)
    )


# `0;chunk-signature=<64 hex>\r\n\r\n`: the final, empty signed chunk.
FINAL_CHUNK_LENGTH = 1 + len(";chunk-signature=") + 64 + 2 + 2


def chunked_length(sizes):
    """Content-Length of signed aws-chunked framing of chunks of `sizes` (plus the final one)."""
    return sum(len(f"{n:x}") + len(";chunk-signature=") + 64 + 2 + n + 2 for n in sizes + [0])


def signed_headers(keys, method, path, body):
    """The headers of a request with `body` signed (SHA-256 payload) now, `host` included."""
    amz_date = datetime.datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    headers = {"host": f"{HOST}:{PORT}", "x-amz-date": amz_date,
               "x-amz-content-sha256": sha256hex(body), "content-length": str(len(body))}
    authorization, _, _, _ = sign(keys, method, path, "", headers, headers["x-amz-content-sha256"],
                                  amz_date, REGION)
    return dict(headers, authorization=authorization)


def raw_request(keys, method, path, body=b"", headers=None, payload_hash=None, chunks=None,
                tamper=None, cut_after=None, content_length=None, query=""):
    """One SigV4-signed request made here and sent to the gateway over TLS: a Reply.

    `path` is the request path, URI-encoded. With `chunks` (a list of bytes) the body is sent
    as STREAMING-AWS4-HMAC-SHA256-PAYLOAD, every chunk signed; `tamper(body) -> body` changes
    the encoded body after signing; `cut_after=n` sends only the first n data chunks (no final
    chunk), with a Content-Length to match, as a replay of a captured upload cut short would.
    Otherwise the body's SHA-256 is signed (or `payload_hash`). `content_length` announces a
    length other than the body's; `query` is the canonical query string (sorted, encoded).
    """
    amz_date = datetime.datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    signed = {"host": f"{HOST}:{PORT}", "x-amz-date": amz_date}
    signed.update({k.lower(): v for k, v in (headers or {}).items()})
    if chunks is not None:
        signed.update({
            "x-amz-content-sha256": STREAMING,
            "content-encoding": "aws-chunked",
            "x-amz-decoded-content-length": str(sum(len(c) for c in chunks)),
            "content-length": str(
                chunked_length([len(c) for c in chunks]) if cut_after is None
                else chunked_length([len(c) for c in chunks[:cut_after]]) - FINAL_CHUNK_LENGTH),
        })
    else:
        signed["x-amz-content-sha256"] = payload_hash or sha256hex(body)
        signed["content-length"] = str(len(body) if content_length is None else content_length)
    authorization, seed, scope, key = sign(
        keys, method, path, query, signed, signed["x-amz-content-sha256"], amz_date, REGION
    )
    if chunks is not None:
        body = chunked_body(chunks, chunk_signatures(key, amz_date, scope, seed, chunks))
        if cut_after is not None:
            sent = chunks[:cut_after]
            body = body[:chunked_length([len(c) for c in sent]) - FINAL_CHUNK_LENGTH]
    if tamper:
        body = tamper(body)
    conn = http.client.HTTPSConnection(
        HOST, PORT, context=ssl.create_default_context(cafile=CA), timeout=60
    )
    try:
        try:
            conn.request(method, path + ("?" + query if query else ""), body=body,
                         headers=dict(signed, authorization=authorization))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway answered before reading the whole body: read what it said
        try:
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        except (http.client.HTTPException, OSError) as e:
            raise Failure(f"{method} {path} got no HTTP answer: {type(e).__name__}: {e}")
    finally:
        conn.close()


def object_path(bucket_name, key):
    return "/" + quote(bucket_name) + "/" + quote(key, safe="/~")


# --- curl, awscli, s3cmd --------------------------------------------------------------------


def curl(url, *options, resolve=None):
    """`curl <options> <url>` trusting the gateway's CA: a Reply (headers of the last response).
    `resolve`: a host name to send to 127.0.0.1 (virtual-hosted buckets)."""
    with tempfile.TemporaryDirectory(dir=TMP) as tmp:
        body_path = os.path.join(tmp, "body")
        head_path = os.path.join(tmp, "headers")
        cmd = [
            "curl", "--silent", "--show-error", "--cacert", CA, "--max-time", "60",
            "--output", body_path, "--dump-header", head_path, "--write-out", "%{http_code}",
        ]
        if resolve:
            cmd += ["--resolve", f"{resolve}:{PORT}:127.0.0.1"]
        cmd += list(options) + [url]
        done = subprocess.run(cmd, capture_output=True, timeout=90, check=False)
        check(
            done.returncode == 0,
            f"curl {' '.join(options)} {url} failed ({done.returncode}): "
            f"{done.stderr.decode(errors='replace').strip()}",
        )
        body = b""
        if os.path.exists(body_path):
            with open(body_path, "rb") as f:
                body = f.read()
        headers = {}
        if os.path.exists(head_path):
            with open(head_path, "rb") as f:
                blocks = [b for b in f.read().decode("latin-1").split("\r\n\r\n") if b.strip()]
            for line in (blocks[-1].splitlines()[1:] if blocks else []):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return Reply(int(done.stdout.decode().strip() or 0), headers, body)


def curl_refused(reply, code, http_status, what):
    check(
        reply.status == http_status and xml_code(reply.body) == code,
        f"{what}: HTTP {reply.status} {xml_code(reply.body)}, expected {http_status} {code}: "
        f"{reply.body[:300]!r}",
    )


def aws(*args, keys=None, virtual=False, endpoint=None, must_succeed=True):
    """`aws <args>` (this virtualenv's awscli) as `keys` (A by default): the CompletedProcess.

    Path-style at AWS_ENDPOINT_URL unless `endpoint`; `virtual`: through `localhost_resolver`,
    at VHOST_ENDPOINT with `addressing_style = virtual`.
    """
    keys = keys or A
    cmd = [sys.executable] + ([RESOLVER] if virtual else []) + [AWS_CLI] + list(args)
    cmd += ["--endpoint-url", endpoint or (VHOST_ENDPOINT if virtual else ENDPOINT)]
    env = dict(os.environ)
    env.pop("AWS_ENDPOINT_URL", None)
    env.update(
        AWS_ACCESS_KEY_ID=keys.access_key,
        AWS_SECRET_ACCESS_KEY=keys.secret_key,
        AWS_DEFAULT_REGION=REGION,
        AWS_CA_BUNDLE=CA,
        AWS_CONFIG_FILE=AWS_CONFIG_VIRTUAL if virtual else AWS_CONFIG_PATH,
        AWS_PAGER="",
        AWS_MAX_ATTEMPTS="1",
    )
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    if must_succeed:
        check(
            done.returncode == 0,
            f"aws {' '.join(args)} failed ({done.returncode}):\n{tail(done.stderr)}\n"
            f"{tail(done.stdout)}",
        )
    return done


def s3cmd_config(name, virtual):
    """An s3cmd configuration for account A: path-style (host_bucket = host_base) or
    virtual-hosted (`%(bucket)s.<domain>:<port>`)."""
    path = os.path.join(TMP, f"{name}.s3cfg")
    host_bucket = f"%(bucket)s.{DOMAIN}:{PORT}" if virtual else f"{HOST}:{PORT}"
    with open(path, "w") as f:
        f.write(
            "[default]\n"
            f"access_key = {A.access_key}\n"
            f"secret_key = {A.secret_key}\n"
            f"host_base = {HOST}:{PORT}\n"
            f"host_bucket = {host_bucket}\n"
            "use_https = True\n"
            f"ca_certs_file = {CA}\n"
            "check_ssl_certificate = True\n"
            "check_ssl_hostname = True\n"
            "signature_v2 = False\n"
            f"bucket_location = {REGION}\n"
            "max_retries = 0\n"
            "progress_meter = False\n"
            "socket_timeout = 60\n"
        )
    return path


def s3cmd(config, *args, virtual=False):
    """`s3cmd -c <config> <args>` (this virtualenv's), which must succeed: its stdout."""
    cmd = [sys.executable] + ([RESOLVER] if virtual else []) + [S3CMD, "-c", config]
    cmd += ["--no-progress"] + list(args)
    env = dict(os.environ, HOME=TMP)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    check(
        done.returncode == 0,
        f"s3cmd {' '.join(args)} failed ({done.returncode}):\n{tail(done.stderr)}\n"
        f"{tail(done.stdout)}",
    )
    return done.stdout


def write_file(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


# --- groups ---------------------------------------------------------------------------------


def group_preflight(suite):
    g = suite.group("preflight")

    @g.setup("tools_are_installed")
    def _():
        for tool in (AWS_CLI, S3CMD):
            check(os.path.exists(tool), f"{tool} is missing; run `make setup`")
        check(subprocess.run(["curl", "--version"], capture_output=True).returncode == 0,
              "curl is missing")

    @g.check("streaming_signer_reproduces_the_aws_example")
    def _():
        # AWS's published example of a signed aws-chunked PUT (66560 bytes of "a": a 64 KiB
        # chunk, a 1 KiB chunk and the final one): the seed and each chunk signature.
        keys = Keys("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
        amz_date = "20130524T000000Z"
        headers = {
            "host": "s3.amazonaws.com",
            "x-amz-date": amz_date,
            "x-amz-storage-class": "REDUCED_REDUNDANCY",
            "x-amz-content-sha256": STREAMING,
            "content-encoding": "aws-chunked",
            "x-amz-decoded-content-length": "66560",
            "content-length": str(chunked_length([65536, 1024])),
        }
        check(headers["content-length"] == "66824", f"framing length {headers['content-length']}")
        _, seed, scope, key = sign(keys, "PUT", "/examplebucket/chunkObject.txt", "", headers,
                                   STREAMING, amz_date, "us-east-1")
        check(seed == "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
              f"seed signature {seed}")
        got = chunk_signatures(key, amz_date, scope, seed, [b"a" * 65536, b"a" * 1024])
        check(got == [
            "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
            "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
            "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
        ], f"chunk signatures {got}")


def group_owners(suite):
    g = suite.group("owners")

    @g.setup("list_buckets_answers_each_account_with_its_own_canonical_id")
    def _():
        a, b = s3(A).list_buckets(), s3(B).list_buckets()
        OWNER["A"] = a.get("Owner", {}).get("ID")
        OWNER["B"] = b.get("Owner", {}).get("ID")
        check(OWNER["A"] and OWNER["B"], f"owners {a.get('Owner')} and {b.get('Owner')}")
        check(OWNER["A"] != OWNER["B"], f"accounts A and B have the same owner ID {OWNER['A']}")


def group_buckets(suite):
    g = suite.group("buckets")
    a, b = s3(A), s3(B)
    name, missing = bucket("buckets"), bucket("missing")

    @g.setup("create_bucket_with_a_canned_acl_and_the_region_as_location_constraint")
    def _():
        make_bucket(a, name, acl="private")

    @g.check("head_bucket_of_an_own_bucket_is_200")
    def _():
        check(status(a.head_bucket(Bucket=name)) == 200, "head_bucket is not 200")

    @g.check("head_bucket_of_a_missing_bucket_is_404")
    def _():
        expect_error("404", 404, a.head_bucket, Bucket=missing)

    @g.check("get_bucket_location_is_the_region")
    def _():
        answer = a.get_bucket_location(Bucket=name)
        check(answer.get("LocationConstraint") == REGION, f"location {brief(answer)}")
        # As AWS: the document on the line after the declaration. The AWS SDK for JavaScript
        # (v2) reads the region with a pattern over one line (`>(.+)</Location`).
        raw = raw_request(A, "GET", "/" + quote(name), query="location=")
        found = re.search(rb">(.+)</Location", raw.body)
        check(raw.status == 200 and found is not None and found.group(1) == REGION.encode(),
              f"HTTP {raw.status}, the SDK would read {found and found.group(1)!r}: {raw.body!r}")

    @g.check("a_client_signing_for_us_east_1_lists_buckets_and_learns_the_region")
    def _():
        # What minio-py and others do before they know the region: list the buckets, or ask
        # a bucket's location, signed for us-east-1 (AWS answers both from any region).
        config = Config(region_name="us-east-1", signature_version="s3v4",
                        retries={"total_max_attempts": 1}, s3={"addressing_style": "path"})
        east = boto3.session.Session(aws_access_key_id=A.access_key,
                                     aws_secret_access_key=A.secret_key).client(
            "s3", endpoint_url=ENDPOINT, verify=CA, config=config, region_name="us-east-1")
        names = [b["Name"] for b in east.list_buckets().get("Buckets", [])]
        check(name in names, f"list_buckets signed for us-east-1 did not list {name}: {names}")
        answer = east.get_bucket_location(Bucket=name)
        check(answer.get("LocationConstraint") == REGION, f"location {brief(answer)}")

    @g.check("configurations_never_set_answer_none_as_s3_does_and_only_to_the_owner")
    def _():
        # What clients that read every configuration of a bucket (Ansible's s3_bucket,
        # minio-py's getters) expect of a bucket where none was set.
        for call, code in [
            (a.get_bucket_encryption, "ServerSideEncryptionConfigurationNotFoundError"),
            (a.get_bucket_ownership_controls, "OwnershipControlsNotFoundError"),
            (a.get_object_lock_configuration, "ObjectLockConfigurationNotFoundError"),
            (a.get_bucket_lifecycle_configuration, "NoSuchLifecycleConfiguration"),
            (a.get_bucket_replication, "ReplicationConfigurationNotFoundError"),
            (a.get_bucket_policy, "NoSuchBucketPolicy"),
            (a.get_bucket_policy_status, "NoSuchBucketPolicy"),
            (a.get_bucket_cors, "NoSuchCORSConfiguration"),
            (a.get_bucket_website, "NoSuchWebsiteConfiguration"),
            (a.get_public_access_block, "NoSuchPublicAccessBlockConfiguration"),
        ]:
            got, status_, e = error_of(call, Bucket=name)
            # Each "not found" is a 404 on AWS (Terraform and crossplane tell them apart by it).
            check(got == code and status_ == 404,
                  f"{call.__name__}: {got} {status_}, expected {code} 404: {e}")
        check(a.get_bucket_request_payment(Bucket=name).get("Payer") == "BucketOwner",
              "request payment")
        check("Status" not in a.get_bucket_accelerate_configuration(Bucket=name), "accelerate")
        check(not a.get_bucket_logging(Bucket=name).get("LoggingEnabled"), "logging")
        inventory = a.list_bucket_inventory_configurations(Bucket=name)
        check(not inventory.get("InventoryConfigurationList") and not inventory.get("IsTruncated"),
              f"inventory {brief(inventory)}")
        notification = a.get_bucket_notification_configuration(Bucket=name)
        check(not any(notification.get(k) for k in ("TopicConfigurations", "QueueConfigurations",
                                                     "LambdaFunctionConfigurations")),
              f"notification {brief(notification)}")
        a.put_object(Bucket=name, Key="lockless.txt", Body=b"x")
        for call in (a.get_object_retention, a.get_object_legal_hold):
            got, _, e = error_of(call, Bucket=name, Key="lockless.txt")
            check(got == "InvalidRequest", f"{call.__name__}: {got}: {e}")
        a.delete_object(Bucket=name, Key="lockless.txt")
        # Another account learns nothing of the bucket's configuration.
        for call in (b.get_bucket_encryption, b.get_bucket_request_payment, b.get_bucket_logging):
            got, status_, e = error_of(call, Bucket=name)
            check(got == "AccessDenied" and status_ == 403, f"B {call.__name__}: {got}: {e}")

    @g.check("list_buckets_pages_with_max_buckets_and_continuation_tokens")
    def _():
        extra = [bucket("pages-1"), bucket("pages-2")]
        for other in extra:
            make_bucket(a, other)
        everything = [x["Name"] for x in a.list_buckets()["Buckets"]]
        names, token = [], None
        for _ in range(len(everything) + 1):
            params = {"MaxBuckets": 1, **({"ContinuationToken": token} if token else {})}
            page = a.list_buckets(**params)
            check(len(page["Buckets"]) <= 1, f"a page of {len(page['Buckets'])} buckets")
            check(all(x.get("BucketRegion") == REGION for x in page["Buckets"]),
                  f"a page with parameters shows the buckets' regions: {page['Buckets']}")
            names += [x["Name"] for x in page["Buckets"]]
            token = page.get("ContinuationToken")
            if not token:
                break
        check(names == everything and len(names) >= 3,
              f"pages of one bucket show {names}, all at once {everything}")
        for other in extra:
            a.delete_bucket(Bucket=other)

    @g.check("list_buckets_shows_the_bucket_with_its_creation_date")
    def _():
        found = [x for x in a.list_buckets()["Buckets"] if x["Name"] == name]
        check(len(found) == 1, f"list_buckets shows {name} {len(found)} times")
        created = found[0].get("CreationDate")
        now = datetime.datetime.now(UTC)
        check(
            isinstance(created, datetime.datetime) and abs((now - created).total_seconds()) < 600,
            f"CreationDate {created!r} is not about now ({now})",
        )

    @g.check("create_bucket_without_location_constraint_is_refused_or_in_the_region")
    def _():
        # AWS's regional endpoints refuse it (IllegalLocationConstraintException); private
        # clouds commonly accept it. Either way a bucket made is in the region.
        other = bucket("no-constraint")
        try:
            a.create_bucket(Bucket=other)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            check(code == "IllegalLocationConstraintException",
                  f"create_bucket without a location constraint failed with {code}: {e}")
            return
        where_ = a.get_bucket_location(Bucket=other).get("LocationConstraint")
        a.delete_bucket(Bucket=other)
        check(where_ == REGION, f"LocationConstraint {where_!r}")

    @g.check("create_bucket_again_is_bucket_already_owned_by_you")
    def _():
        expect_error("BucketAlreadyOwnedByYou", 409, a.create_bucket, Bucket=name,
                     CreateBucketConfiguration=location())

    @g.check("create_bucket_of_a_name_another_account_owns_is_bucket_already_exists")
    def _():
        expect_error("BucketAlreadyExists", 409, b.create_bucket, Bucket=name,
                     CreateBucketConfiguration=location())

    invalid = [
        ("two_characters", "ab"),
        ("upper_case_and_underscore", "Bad_Name"),
        ("64_characters", "k" * 64),
        ("a_leading_dash", "-starts-with-dash"),
        ("two_dots_in_a_row", "two..dots"),
        ("an_ip_address", "192.168.5.4"),
    ]
    for label, bad in invalid:
        @g.check(f"create_bucket_with_{label}_is_invalid_bucket_name")
        def _(bad=bad):
            try:
                answer = a.create_bucket(Bucket=bad, CreateBucketConfiguration=location())
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code")
                got = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                check(code == "InvalidBucketName" and got == 400,
                      f"create_bucket {bad!r}: {code} (HTTP {got}), expected InvalidBucketName")
                check(e.response.get("Error", {}).get("Message"),
                      f"create_bucket {bad!r}: InvalidBucketName without a message")
                return
            try:
                a.delete_bucket(Bucket=bad)
            finally:
                raise Failure(f"create_bucket {bad!r} succeeded: {brief(answer)}")

    @g.check("delete_bucket_with_objects_is_bucket_not_empty")
    def _():
        a.put_object(Bucket=name, Key="keep.txt", Body=b"keep")
        expect_error("BucketNotEmpty", 409, a.delete_bucket, Bucket=name)
        a.head_bucket(Bucket=name)

    @g.check("delete_bucket_of_a_missing_bucket_is_no_such_bucket")
    def _():
        expect_error("NoSuchBucket", 404, a.delete_bucket, Bucket=missing)

    @g.check("object_operations_in_a_missing_bucket_are_no_such_bucket")
    def _():
        for call, params in (
            (a.list_objects, {}),
            (a.list_objects_v2, {}),
            (a.get_object, {"Key": "k"}),
            (a.put_object, {"Key": "k", "Body": b"x"}),
            (a.get_bucket_location, {}),
        ):
            expect_error("NoSuchBucket", 404, call, Bucket=missing, **params)

    @g.check("delete_bucket_when_empty_removes_it")
    def _():
        a.delete_object(Bucket=name, Key="keep.txt")
        answer = a.delete_bucket(Bucket=name)
        check(status(answer) == 204, f"delete_bucket answered HTTP {status(answer)}")
        expect_error("404", 404, a.head_bucket, Bucket=name)
        names = [x["Name"] for x in a.list_buckets()["Buckets"]]
        check(name not in names, f"list_buckets still shows {name}")


def group_objects(suite):
    g = suite.group("objects")
    a = s3(A)
    plain = s3(A, checksums="when_required")
    name = bucket("objects")
    body = b"".join(b"%04d" % i for i in range(100))  # 400 bytes: "0000000100020003..."
    n = len(body)
    st = {}

    @g.setup("create_bucket")
    def _():
        make_bucket(a, name)

    @g.check("get_object_attributes_answers_etag_size_class_checksum_and_parts")
    def _():
        data = b"attributes\n" * 1000
        a.put_object(Bucket=name, Key="attrs.txt", Body=data, ChecksumAlgorithm="SHA256")
        got = a.get_object_attributes(
            Bucket=name, Key="attrs.txt",
            ObjectAttributes=["ETag", "ObjectSize", "StorageClass", "Checksum", "ObjectParts"])
        # AWS shows this ETag without quotes; Karri's S3 library always quotes one.
        check(got.get("ETag", "").strip('"') == md5hex(data), f"ETag {got.get('ETag')}")
        check(got.get("ObjectSize") == len(data), f"ObjectSize {got.get('ObjectSize')}")
        check(got.get("StorageClass") == "STANDARD", f"StorageClass {got.get('StorageClass')}")
        want = base64.b64encode(hashlib.sha256(data).digest()).decode()
        check(got.get("Checksum", {}).get("ChecksumSHA256") == want, f"Checksum {got.get('Checksum')}")
        check("ObjectParts" not in got, f"a single-part object shows parts {got.get('ObjectParts')}")
        only = a.get_object_attributes(Bucket=name, Key="attrs.txt", ObjectAttributes=["ObjectSize"])
        check("ETag" not in only and only.get("ObjectSize") == len(data), f"asked for the size: {only}")
        upload = a.create_multipart_upload(Bucket=name, Key="attrs-mp.bin")["UploadId"]
        part = b"p" * (5 * 1024 * 1024)
        etags = [a.upload_part(Bucket=name, Key="attrs-mp.bin", UploadId=upload, PartNumber=n,
                               Body=part)["ETag"] for n in (1, 2)]
        a.complete_multipart_upload(
            Bucket=name, Key="attrs-mp.bin", UploadId=upload,
            MultipartUpload={"Parts": [{"ETag": e, "PartNumber": n}
                                       for n, e in zip((1, 2), etags)]})
        mp = a.get_object_attributes(Bucket=name, Key="attrs-mp.bin",
                                     ObjectAttributes=["ObjectParts", "ObjectSize"])
        check(mp.get("ObjectParts", {}).get("TotalPartsCount") == 2 and mp.get("ObjectSize") == 2 * len(part),
              f"multipart attributes {mp}")
        expect_error("NoSuchKey", 404, a.get_object_attributes, Bucket=name, Key="no-such-attrs",
                     ObjectAttributes=["ETag"])
        a.delete_objects(Bucket=name, Delete={"Objects": [{"Key": "attrs.txt"}, {"Key": "attrs-mp.bin"}]})

    @g.check("an_object_without_a_content_type_is_binary_octet_stream_and_listed_at_its_head_time")
    def _():
        plain.put_object(Bucket=name, Key="untyped", Body=b"?")
        sent = dict((k, v) for k, v in plain.sent[-1][2].items())
        check("content-type" not in sent, f"the PUT sent a Content-Type: {sent}")
        head = a.head_object(Bucket=name, Key="untyped")
        check(head.get("ContentType") == "binary/octet-stream", f"ContentType {head.get('ContentType')}")
        got = a.get_object(Bucket=name, Key="untyped")
        check(got.get("ContentType") == "binary/octet-stream", f"GET ContentType {got.get('ContentType')}")
        listed = [o for o in a.list_objects_v2(Bucket=name, Prefix="untyped").get("Contents", [])]
        check(len(listed) == 1 and listed[0]["LastModified"] == head["LastModified"],
              f"listed at {[o['LastModified'] for o in listed]}, HEAD says {head['LastModified']}")
        a.delete_object(Bucket=name, Key="untyped")

    @g.setup("put_object_answers_the_md5_etag")
    def _():
        answer = a.put_object(Bucket=name, Key="plain.txt", Body=body)
        check(answer.get("ETag") == etag_of(body), f"ETag {answer.get('ETag')}, "
              f"expected {etag_of(body)}")

    @g.setup("head_object_answers_length_etag_and_last_modified")
    def _():
        head = a.head_object(Bucket=name, Key="plain.txt")
        check(head["ContentLength"] == n, f"ContentLength {head['ContentLength']}, expected {n}")
        check(head["ETag"] == etag_of(body), f"ETag {head['ETag']}")
        check(isinstance(head.get("LastModified"), datetime.datetime), f"head {brief(head)}")
        st["last_modified"] = head["LastModified"]

    @g.check("get_object_answers_the_bytes")
    def _():
        answer = a.get_object(Bucket=name, Key="plain.txt")
        got = answer["Body"].read()
        check(got == body, f"body {got[:40]!r}... ({len(got)} bytes), expected {n} bytes")
        check(answer["ETag"] == etag_of(body) and answer["ContentLength"] == n,
              f"get_object {brief(answer)}")

    def ranged(spec, start, end):
        answer = a.get_object(Bucket=name, Key="plain.txt", Range=spec)
        got = answer["Body"].read()
        check(status(answer) == 206, f"Range {spec}: HTTP {status(answer)}, expected 206")
        check(got == body[start:end + 1], f"Range {spec}: body {got!r}, expected "
              f"{body[start:end + 1]!r}")
        expected = f"bytes {start}-{end}/{n}"
        check(answer.get("ContentRange") == expected,
              f"Range {spec}: Content-Range {answer.get('ContentRange')!r}, expected {expected!r}")
        check(answer["ContentLength"] == end - start + 1,
              f"Range {spec}: Content-Length {answer['ContentLength']}")

    @g.check("get_object_range_bytes_0_9_is_the_first_ten_bytes")
    def _():
        ranged("bytes=0-9", 0, 9)

    @g.check("get_object_range_bytes_minus_5_is_the_last_five_bytes")
    def _():
        ranged("bytes=-5", n - 5, n - 1)

    @g.check("get_object_range_bytes_10_dash_is_everything_from_offset_10")
    def _():
        ranged("bytes=10-", 10, n - 1)

    @g.check("get_object_range_ending_past_the_end_stops_at_the_end")
    def _():
        ranged(f"bytes={n - 10}-{n + 1000}", n - 10, n - 1)

    @g.check("get_object_range_starting_past_the_end_is_invalid_range_416")
    def _():
        expect_error("InvalidRange", 416, a.get_object, Bucket=name, Key="plain.txt",
                     Range=f"bytes={n}-")
        expect_error("InvalidRange", 416, a.get_object, Bucket=name, Key="plain.txt",
                     Range=f"bytes={n + 100}-{n + 200}")

    def got_object(**conditions):
        answer = a.get_object(Bucket=name, Key="plain.txt", **conditions)
        check(status(answer) == 200 and answer["Body"].read() == body,
              f"get_object({brief(conditions)}) answered HTTP {status(answer)}")

    @g.check("get_object_if_match_of_the_etag_is_200")
    def _():
        got_object(IfMatch=etag_of(body))

    @g.check("get_object_if_match_of_another_etag_is_precondition_failed_412")
    def _():
        expect_error("PreconditionFailed", 412, a.get_object, Bucket=name, Key="plain.txt",
                     IfMatch=etag_of(b"something else"))

    @g.check("get_object_if_none_match_of_the_etag_is_304")
    def _():
        not_modified(a.get_object, etag_of(body), Bucket=name, Key="plain.txt",
                     IfNoneMatch=etag_of(body))

    @g.check("get_object_if_none_match_of_another_etag_is_200")
    def _():
        got_object(IfNoneMatch=etag_of(b"something else"))

    @g.check("get_object_if_modified_since_its_last_modified_is_304")
    def _():
        not_modified(a.get_object, etag_of(body), Bucket=name, Key="plain.txt",
                     IfModifiedSince=st["last_modified"])

    @g.check("get_object_if_modified_since_a_day_before_is_200")
    def _():
        got_object(IfModifiedSince=st["last_modified"] - datetime.timedelta(days=1))

    @g.check("get_object_if_unmodified_since_a_day_before_is_precondition_failed_412")
    def _():
        expect_error("PreconditionFailed", 412, a.get_object, Bucket=name, Key="plain.txt",
                     IfUnmodifiedSince=st["last_modified"] - datetime.timedelta(days=1))

    @g.check("get_object_if_unmodified_since_its_last_modified_is_200")
    def _():
        got_object(IfUnmodifiedSince=st["last_modified"])

    @g.check("head_object_if_none_match_of_the_etag_is_304")
    def _():
        not_modified(a.head_object, etag_of(body), Bucket=name, Key="plain.txt",
                     IfNoneMatch=etag_of(body))

    @g.check("head_object_if_match_of_another_etag_is_412")
    def _():
        expect_error("412", 412, a.head_object, Bucket=name, Key="plain.txt",
                     IfMatch=etag_of(b"something else"))

    system = {
        "ContentType": "text/plain; charset=utf-8",
        "CacheControl": "max-age=60, public",
        "ContentDisposition": 'attachment; filename="report.txt"',
        "ContentEncoding": "gzip",
        "ContentLanguage": "en-GB",
        "Expires": datetime.datetime(2037, 1, 1, tzinfo=UTC),
    }
    system_headers = {
        "content-type": system["ContentType"],
        "cache-control": system["CacheControl"],
        "content-disposition": system["ContentDisposition"],
        "content-encoding": "gzip",
        "content-language": "en-GB",
        "expires": "Thu, 01 Jan 2037 00:00:00 GMT",
    }
    metadata = {"color": "blue", "Mixed-Case": "Value With Spaces"}
    gzipped = gzip.compress(b"hello, metadata\n" * 10)

    def check_metadata(answer, what, expected_meta=None, expected_headers=None):
        expected_meta = {k.lower(): v for k, v in (expected_meta or metadata).items()}
        meta = {k.lower(): v for k, v in answer.get("Metadata", {}).items()}
        check(meta == expected_meta, f"{what}: metadata {meta}, expected {expected_meta}")
        for h, value in (expected_headers or system_headers).items():
            check(header(answer, h) == value,
                  f"{what}: {h} is {header(answer, h)!r}, expected {value!r}")

    @g.check("user_metadata_and_system_headers_round_trip")
    def _():
        plain.put_object(Bucket=name, Key="meta.txt", Body=gzipped, Metadata=metadata, **system)
        check_metadata(a.head_object(Bucket=name, Key="meta.txt"), "head_object")
        answer = a.get_object(Bucket=name, Key="meta.txt")
        check_metadata(answer, "get_object")
        check(answer["Body"].read() == gzipped, "get_object changed the gzip bytes")

    @g.check("content_encoding_of_an_aws_chunked_upload_is_stored_without_aws_chunked")
    def _():
        a.put_object(Bucket=name, Key="gzip.txt", Body=gzipped, ContentEncoding="gzip")
        sent = last_sent(a)[2]
        check(sent.get("content-encoding") == "gzip,aws-chunked",
              f"boto3 sent Content-Encoding {sent.get('content-encoding')!r}")
        head = a.head_object(Bucket=name, Key="gzip.txt")
        check(header(head, "content-encoding") == "gzip",
              f"stored Content-Encoding {header(head, 'content-encoding')!r}, expected 'gzip'")
        check(body_of(a, name, "gzip.txt") == gzipped, "the gzip bytes changed")

    @g.check("put_object_over_an_object_replaces_it")
    def _():
        a.put_object(Bucket=name, Key="overwrite.txt", Body=b"first version")
        answer = a.put_object(Bucket=name, Key="overwrite.txt", Body=b"second")
        check(answer["ETag"] == etag_of(b"second"), f"ETag {answer['ETag']}")
        got = a.get_object(Bucket=name, Key="overwrite.txt")
        check(got["Body"].read() == b"second" and got["ETag"] == etag_of(b"second"),
              f"after the overwrite get_object answers {brief(got)}")

    @g.check("empty_object_has_the_md5_of_nothing")
    def _():
        answer = a.put_object(Bucket=name, Key="empty", Body=b"")
        check(answer["ETag"] == '"d41d8cd98f00b204e9800998ecf8427e"', f"ETag {answer['ETag']}")
        got = a.get_object(Bucket=name, Key="empty")
        check(got["ContentLength"] == 0 and got["Body"].read() == b"", f"got {brief(got)}")

    special = [
        "dir/with space/ünïcödé ✓.txt",
        "a+b=c&d;e,f@g$h.txt",
        "percent%20literal.txt",
        "question?hash#.txt",
        "tilde~quote'paren(1).txt",
        "日本語/キー.txt",
        "folder-marker/",
    ]

    @g.check("keys_with_spaces_unicode_and_reserved_characters_round_trip")
    def _():
        for key in special:
            a.put_object(Bucket=name, Key=key, Body=key.encode())
        for key in special:
            got = body_of(a, name, key)
            check(got == key.encode(), f"get_object {key!r} answered {got!r}")
        listed = set()
        for page in a.get_paginator("list_objects_v2").paginate(Bucket=name):
            listed.update(keys_of(page))
        check(set(special) <= listed, f"list_objects_v2 lacks {sorted(set(special) - listed)}; "
              f"it lists {sorted(listed)}")

    @g.check("delete_object_removes_it_and_get_is_no_such_key")
    def _():
        a.put_object(Bucket=name, Key="doomed.txt", Body=b"x")
        answer = a.delete_object(Bucket=name, Key="doomed.txt")
        check(status(answer) == 204, f"delete_object answered HTTP {status(answer)}")
        expect_error("NoSuchKey", 404, a.get_object, Bucket=name, Key="doomed.txt")
        expect_error("404", 404, a.head_object, Bucket=name, Key="doomed.txt")

    @g.check("delete_object_of_a_missing_key_is_204")
    def _():
        answer = a.delete_object(Bucket=name, Key="never-was.txt")
        check(status(answer) == 204, f"delete_object answered HTTP {status(answer)}")

    @g.check("delete_object_if_match_deletes_only_the_version_it_names")
    def _():
        a.put_object(Bucket=name, Key="guarded.txt", Body=b"v1")
        expect_error("PreconditionFailed", 412, a.delete_object, Bucket=name,
                     Key="guarded.txt", IfMatch=etag_of(b"another body"))
        check(body_of(a, name, "guarded.txt") == b"v1", "a failed If-Match deleted the object")
        answer = a.delete_object(Bucket=name, Key="guarded.txt", IfMatch=etag_of(b"v1"))
        check(status(answer) == 204, f"delete_object answered HTTP {status(answer)}")
        expect_error("NoSuchKey", 404, a.get_object, Bucket=name, Key="guarded.txt")
        expect_error("NoSuchKey", 404, a.delete_object, Bucket=name, Key="guarded.txt",
                     IfMatch="*")

    @g.check("delete_objects_with_an_etag_deletes_a_key_only_if_it_still_has_it")
    def _():
        a.put_object(Bucket=name, Key="etag/kept", Body=b"kept")
        a.put_object(Bucket=name, Key="etag/gone", Body=b"gone")
        answer = a.delete_objects(Bucket=name, Delete={"Objects": [
            {"Key": "etag/kept", "ETag": etag_of(b"not this")},
            {"Key": "etag/gone", "ETag": etag_of(b"gone")},
        ]})
        deleted = [d["Key"] for d in answer.get("Deleted", [])]
        errors = [(e["Key"], e["Code"]) for e in answer.get("Errors", [])]
        check(deleted == ["etag/gone"], f"Deleted {deleted}")
        check(errors == [("etag/kept", "PreconditionFailed")], f"Errors {errors}")
        left = keys_of(a.list_objects_v2(Bucket=name, Prefix="etag/"))
        check(left == ["etag/kept"], f"after delete_objects etag/ holds {left}")

    @g.check("get_object_of_a_missing_key_is_no_such_key")
    def _():
        expect_error("NoSuchKey", 404, a.get_object, Bucket=name, Key="never-was.txt")

    @g.check("delete_objects_reports_every_key_it_deleted")
    def _():
        for i in range(1, 6):
            a.put_object(Bucket=name, Key=f"multi/{i}", Body=b"%d" % i)
        asked = ["multi/1", "multi/2", "multi/3", "multi/never-was"]
        answer = a.delete_objects(
            Bucket=name, Delete={"Objects": [{"Key": k} for k in asked], "Quiet": False}
        )
        deleted = sorted(d["Key"] for d in answer.get("Deleted", []))
        check(deleted == sorted(asked), f"Deleted {deleted}, expected {sorted(asked)}")
        check(not answer.get("Errors"), f"Errors {answer.get('Errors')}")
        left = keys_of(a.list_objects_v2(Bucket=name, Prefix="multi/"))
        check(left == ["multi/4", "multi/5"], f"after delete_objects multi/ holds {left}")

    @g.check("delete_objects_quiet_reports_nothing_and_deletes")
    def _():
        answer = a.delete_objects(
            Bucket=name, Delete={"Objects": [{"Key": "multi/4"}, {"Key": "multi/5"}],
                                 "Quiet": True}
        )
        check(not answer.get("Deleted") and not answer.get("Errors"),
              f"quiet delete_objects answered {brief(answer)}")
        left = keys_of(a.list_objects_v2(Bucket=name, Prefix="multi/"))
        check(left == [], f"after the quiet delete_objects multi/ holds {left}")

    @g.check("copy_object_with_metadata_directive_copy_keeps_metadata")
    def _():
        plain.put_object(Bucket=name, Key="src.txt", Body=gzipped, Metadata=metadata, **system)
        answer = a.copy_object(Bucket=name, Key="copy.txt",
                               CopySource={"Bucket": name, "Key": "src.txt"})
        check(answer["CopyObjectResult"]["ETag"] == etag_of(gzipped),
              f"CopyObjectResult {answer['CopyObjectResult']}")
        got = a.get_object(Bucket=name, Key="copy.txt")
        check_metadata(got, "the copy")
        check(got["Body"].read() == gzipped and got["ETag"] == etag_of(gzipped),
              "the copy's bytes or ETag differ")

    @g.check("copy_object_with_metadata_directive_replace_sets_new_metadata")
    def _():
        a.copy_object(Bucket=name, Key="replaced.txt",
                      CopySource={"Bucket": name, "Key": "src.txt"},
                      MetadataDirective="REPLACE", Metadata={"fresh": "yes"},
                      ContentType="application/json")
        head = a.head_object(Bucket=name, Key="replaced.txt")
        check_metadata(head, "the REPLACE copy", {"fresh": "yes"},
                       {"content-type": "application/json"})
        check(header(head, "cache-control") is None,
              f"REPLACE kept Cache-Control {header(head, 'cache-control')!r}")

    @g.check("copy_object_onto_itself_with_replace_updates_its_metadata")
    def _():
        a.copy_object(Bucket=name, Key="src.txt", CopySource={"Bucket": name, "Key": "src.txt"},
                      MetadataDirective="REPLACE", Metadata={"round": "two"},
                      ContentType="text/csv")
        head = a.head_object(Bucket=name, Key="src.txt")
        check_metadata(head, "src.txt after the self-copy", {"round": "two"},
                       {"content-type": "text/csv"})
        check(body_of(a, name, "src.txt") == gzipped, "the self-copy changed the bytes")

    @g.check("copy_object_onto_itself_without_changes_is_invalid_request")
    def _():
        expect_error("InvalidRequest", 400, a.copy_object, Bucket=name, Key="src.txt",
                     CopySource={"Bucket": name, "Key": "src.txt"})

    @g.check("copy_object_of_a_key_with_spaces_and_unicode_to_another_bucket")
    def _():
        other = bucket("objects-copies")
        make_bucket(a, other)
        key = special[0]
        a.copy_object(Bucket=other, Key=key, CopySource={"Bucket": name, "Key": key})
        check(body_of(a, other, key) == key.encode(), "the copied bytes differ")

    @g.check("copy_object_whose_source_conditions_fail_is_precondition_failed")
    def _():
        later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
        source = {"Bucket": name, "Key": "src.txt"}
        expect_error("PreconditionFailed", 412, a.copy_object, Bucket=name, Key="cond.txt",
                     CopySource=source, CopySourceIfModifiedSince=later)
        expect_error("PreconditionFailed", 412, a.copy_object, Bucket=name, Key="cond.txt",
                     CopySource=source, CopySourceIfMatch='"0123456789abcdef0123456789abcdef"')
        expect_error("NoSuchKey", 404, a.get_object, Bucket=name, Key="cond.txt")

    @g.check("copy_object_if_none_match_star_does_not_replace_an_existing_key")
    def _():
        source = {"Bucket": name, "Key": "src.txt"}
        a.put_object(Bucket=name, Key="taken.txt", Body=b"mine")
        expect_error("PreconditionFailed", 412, a.copy_object, Bucket=name, Key="taken.txt",
                     CopySource=source, IfNoneMatch="*")
        expect_error("PreconditionFailed", 412, a.copy_object, Bucket=name, Key="taken.txt",
                     CopySource=source, IfMatch=etag_of(b"not mine"))
        check(body_of(a, name, "taken.txt") == b"mine", "a failed condition let the copy in")
        a.copy_object(Bucket=name, Key="taken.txt", CopySource=source, IfMatch=etag_of(b"mine"))
        check(body_of(a, name, "taken.txt") == gzipped, "the copy under a holding If-Match "
              "did not replace the object")
        a.copy_object(Bucket=name, Key="fresh-copy.txt", CopySource=source, IfNoneMatch="*")
        check(body_of(a, name, "fresh-copy.txt") == gzipped, "the copy to a new key differs")

    @g.check("copy_object_of_a_missing_source_is_no_such_key")
    def _():
        expect_error("NoSuchKey", 404, a.copy_object, Bucket=name, Key="copy2.txt",
                     CopySource={"Bucket": name, "Key": "never-was.txt"})

    data = os.urandom(150 * KIB)

    @g.check("put_object_with_a_signed_sha256_payload")
    def _():
        plain.put_object(Bucket=name, Key="signed.bin", Body=data)
        sent = last_sent(plain)[2]
        check(sent.get("x-amz-content-sha256") == sha256hex(data),
              f"boto3 sent x-amz-content-sha256 {sent.get('x-amz-content-sha256')!r}")
        check(body_of(a, name, "signed.bin") == data, "the stored bytes differ")

    @g.check("put_object_with_unsigned_payload_and_content_md5")
    def _():
        plain.put_object(Bucket=name, Key="unsigned.bin", Body=data, ContentMD5=b64md5(data))
        sent = last_sent(plain)[2]
        check(sent.get("x-amz-content-sha256") == "UNSIGNED-PAYLOAD",
              f"boto3 sent x-amz-content-sha256 {sent.get('x-amz-content-sha256')!r}")
        check(body_of(a, name, "unsigned.bin") == data, "the stored bytes differ")

    @g.check("put_object_aws_chunked_with_a_crc32_trailer")
    def _():
        answer = a.put_object(Bucket=name, Key="trailer.bin", Body=data)
        sent = last_sent(a)[2]
        check(sent.get("x-amz-content-sha256") == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
              and sent.get("x-amz-trailer") == "x-amz-checksum-crc32",
              f"boto3 sent {sent.get('x-amz-content-sha256')!r} with trailer "
              f"{sent.get('x-amz-trailer')!r}")
        check(answer["ETag"] == etag_of(data), f"ETag {answer['ETag']}")
        check(body_of(a, name, "trailer.bin") == data, "the stored bytes differ")

    chunks = [data[:64 * KIB], data[64 * KIB:128 * KIB], data[128 * KIB:]]

    @g.check("put_object_aws_chunked_with_signed_chunks")
    def _():
        reply = raw_request(A, "PUT", object_path(name, "chunks.bin"), chunks=chunks,
                            headers={"content-type": "application/octet-stream"})
        check(reply.status == 200, f"HTTP {reply.status}: {reply.body[:300]!r}")
        check(reply.headers.get("etag") == etag_of(data), f"ETag {reply.headers.get('etag')}")
        got = a.get_object(Bucket=name, Key="chunks.bin")
        check(got["Body"].read() == data and got["ContentLength"] == len(data),
              "the stored bytes differ from the decoded chunks")
        check(header(got, "content-encoding") in (None, ""),
              f"stored Content-Encoding {header(got, 'content-encoding')!r}")

    @g.check("put_object_with_a_tampered_signed_chunk_is_refused_and_stores_nothing")
    def _():
        def tamper(encoded):
            # Flip a byte inside the last data chunk (its signature no longer matches).
            at = len(encoded) - 200
            return encoded[:at] + bytes([encoded[at] ^ 1]) + encoded[at + 1:]

        reply = raw_request(A, "PUT", object_path(name, "tampered.bin"), chunks=chunks,
                            tamper=tamper)
        check(reply.status == 403 and xml_code(reply.body) == "SignatureDoesNotMatch",
              f"HTTP {reply.status} {xml_code(reply.body)}, expected 403 SignatureDoesNotMatch")
        check(not exists(a, name, "tampered.bin"), "the tampered upload is visible")

    @g.check("put_object_whose_signed_chunks_are_cut_short_is_refused_and_stores_nothing")
    def _():
        # The first two of three signed chunks, every signature good, then the end of the body.
        reply = raw_request(A, "PUT", object_path(name, "truncated.bin"), chunks=chunks,
                            cut_after=2)
        check(reply.status == 400 and xml_code(reply.body) == "IncompleteBody",
              f"HTTP {reply.status} {xml_code(reply.body)}, expected 400 IncompleteBody")
        check(not exists(a, name, "truncated.bin"), "the truncated upload is visible")

    @g.check("put_object_whose_body_differs_from_its_signed_sha256_is_refused")
    def _():
        reply = raw_request(A, "PUT", object_path(name, "mismatch.bin"), body=b"the real body",
                            payload_hash=sha256hex(b"the signed body"))
        check(reply.status == 400 and xml_code(reply.body) == "XAmzContentSHA256Mismatch",
              f"HTTP {reply.status} {xml_code(reply.body)}, expected 400 "
              f"XAmzContentSHA256Mismatch")
        check(not exists(a, name, "mismatch.bin"), "the mismatched upload is visible")

    @g.check("put_object_with_a_wrong_content_md5_is_bad_digest_and_stores_nothing")
    def _():
        expect_error("BadDigest", 400, plain.put_object, Bucket=name, Key="bad-md5.bin",
                     Body=data, ContentMD5=b64md5(b"other bytes"))
        check(not exists(a, name, "bad-md5.bin"), "the upload with a wrong MD5 is visible")

    @g.check("put_copy_and_multipart_in_a_class_karri_lacks_are_invalid_storage_class")
    def _():
        a.put_object(Bucket=name, Key="standard.bin", Body=data, StorageClass="STANDARD")
        source = {"Bucket": name, "Key": "standard.bin"}
        for cls in ["GLACIER", "BOGUS"]:
            expect_error("InvalidStorageClass", 400, a.put_object, Bucket=name, Key="cold.bin",
                         Body=data, StorageClass=cls)
            expect_error("InvalidStorageClass", 400, a.copy_object, Bucket=name, Key="cold.bin",
                         CopySource=source, StorageClass=cls)
            expect_error("InvalidStorageClass", 400, a.create_multipart_upload, Bucket=name,
                         Key="cold.bin", StorageClass=cls)
        check(not exists(a, name, "cold.bin"), "an object of a refused class is visible")
        uploads = a.list_multipart_uploads(Bucket=name).get("Uploads", [])
        check(all(u["Key"] != "cold.bin" for u in uploads), f"a refused upload is listed: {uploads}")

    @g.check("encryption_karri_cannot_give_is_refused_and_sse_s3_is_taken")
    def _():
        a.put_object(Bucket=name, Key="sse-s3.bin", Body=data, ServerSideEncryption="AES256")
        source = {"Bucket": name, "Key": "standard.bin"}
        customer = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": "k" * 32}
        for kms in [{"ServerSideEncryption": "aws:kms"},
                    {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/x"}]:
            expect_error("NotImplemented", 501, a.put_object, Bucket=name, Key="kms.bin",
                         Body=data, **kms)
            expect_error("NotImplemented", 501, a.copy_object, Bucket=name, Key="kms.bin",
                         CopySource=source, **kms)
            expect_error("NotImplemented", 501, a.create_multipart_upload, Bucket=name,
                         Key="kms.bin", **kms)
        expect_error("NotImplemented", 501, a.put_object, Bucket=name, Key="kms.bin",
                     Body=data, **customer)
        check(not exists(a, name, "kms.bin"), "an object with refused encryption is visible")
        # No object was written with a customer key, so none is read with one.
        expect_error("InvalidRequest", 400, a.get_object, Bucket=name, Key="sse-s3.bin",
                     **customer)
        # A key that is not there is NoSuchKey with them as without (rclone HEADs the target of
        # a copy with the customer key it would upload with).
        expect_error("NoSuchKey", 404, a.get_object, Bucket=name, Key="no-such.bin", **customer)
        expect_error("404", 404, a.head_object, Bucket=name, Key="no-such.bin", **customer)


    def crc32_b64(body):
        return base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()

    @g.check("put_object_whose_crc32_header_differs_is_bad_digest_and_stores_nothing")
    def _():
        reply = raw_request(A, "PUT", object_path(name, "bad-crc.bin"), body=data,
                            headers={"x-amz-checksum-crc32": crc32_b64(b"other bytes")})
        check(reply.status == 400 and xml_code(reply.body) == "BadDigest",
              f"HTTP {reply.status} {xml_code(reply.body)}, expected 400 BadDigest")
        check(not exists(a, name, "bad-crc.bin"), "the upload with a wrong CRC32 is visible")
        reply = raw_request(A, "PUT", object_path(name, "good-crc.bin"), body=data,
                            headers={"x-amz-checksum-crc32": crc32_b64(data)})
        check(reply.status == 200 and reply.headers.get("x-amz-checksum-crc32") == crc32_b64(data),
              f"HTTP {reply.status}, x-amz-checksum-crc32 {reply.headers.get('x-amz-checksum-crc32')}")

    def trailer_put(key, trailer_value):
        # STREAMING-UNSIGNED-PAYLOAD-TRAILER as botocore frames it: chunks, then the trailer.
        framed = (f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n"
                  + f"x-amz-checksum-crc32:{trailer_value}\r\n\r\n".encode())
        return raw_request(A, "PUT", object_path(name, key), body=framed,
                           payload_hash="STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                           headers={"content-encoding": "aws-chunked",
                                    "x-amz-decoded-content-length": str(len(data)),
                                    "x-amz-trailer": "x-amz-checksum-crc32"})

    @g.check("put_object_whose_crc32_trailer_differs_is_bad_digest_and_stores_nothing")
    def _():
        reply = trailer_put("bad-trailer.bin", crc32_b64(b"other bytes"))
        check(reply.status == 400 and xml_code(reply.body) == "BadDigest",
              f"HTTP {reply.status} {xml_code(reply.body)}, expected 400 BadDigest")
        check(not exists(a, name, "bad-trailer.bin"), "the upload with a wrong trailer is visible")
        reply = trailer_put("good-trailer.bin", crc32_b64(data))
        check(reply.status == 200, f"HTTP {reply.status}: {reply.body[:300]!r}")
        check(body_of(a, name, "good-trailer.bin") == data, "the stored bytes differ")

    @g.check("put_object_and_upload_part_answer_the_sha256_checksum_asked_for")
    def _():
        want = base64.b64encode(hashlib.sha256(data).digest()).decode()
        answer = a.put_object(Bucket=name, Key="sha256.bin", Body=data, ChecksumAlgorithm="SHA256")
        check(answer.get("ChecksumSHA256") == want, f"ChecksumSHA256 {answer.get('ChecksumSHA256')}")
        upload_id = a.create_multipart_upload(Bucket=name, Key="sha256-parts.bin",
                                              ChecksumAlgorithm="SHA256")["UploadId"]
        part = a.upload_part(Bucket=name, Key="sha256-parts.bin", UploadId=upload_id,
                             PartNumber=1, Body=data, ChecksumAlgorithm="SHA256")
        check(part.get("ChecksumSHA256") == want, f"part ChecksumSHA256 {part.get('ChecksumSHA256')}")
        a.abort_multipart_upload(Bucket=name, Key="sha256-parts.bin", UploadId=upload_id)

    @g.check("get_and_head_object_return_the_uploaded_checksum_for_the_whole_object_when_asked")
    def _():
        want = base64.b64encode(hashlib.sha256(data).digest()).decode()
        a.put_object(Bucket=name, Key="kept-sum.bin", Body=data, ChecksumAlgorithm="SHA256")
        got = a.get_object(Bucket=name, Key="kept-sum.bin", ChecksumMode="ENABLED")
        check(got.get("ChecksumSHA256") == want, f"GET ChecksumSHA256 {got.get('ChecksumSHA256')}")
        check(got.get("ChecksumType") == "FULL_OBJECT", f"GET ChecksumType {got.get('ChecksumType')}")
        check(got["Body"].read() == data, "the bytes read differ")
        head = a.head_object(Bucket=name, Key="kept-sum.bin", ChecksumMode="ENABLED")
        check(head.get("ChecksumSHA256") == want, f"HEAD ChecksumSHA256 {head.get('ChecksumSHA256')}")
        # A range is not the object its checksum is of.
        part = a.get_object(Bucket=name, Key="kept-sum.bin", Range="bytes=0-3",
                            ChecksumMode="ENABLED")
        check("ChecksumSHA256" not in part, f"a range carried ChecksumSHA256 {part.get('ChecksumSHA256')}")
        part["Body"].read()
        # A copy holds the same bytes, and so the same checksum.
        a.copy_object(Bucket=name, Key="kept-sum-copy.bin",
                      CopySource={"Bucket": name, "Key": "kept-sum.bin"})
        copy = a.head_object(Bucket=name, Key="kept-sum-copy.bin", ChecksumMode="ENABLED")
        check(copy.get("ChecksumSHA256") == want, f"copy ChecksumSHA256 {copy.get('ChecksumSHA256')}")
        # A copy that asks for another algorithm gets its checksum, stored and answered; a
        # copy onto itself that asks for one adds it (as S3 documents).
        crc = crc32_b64(data)
        answer = a.copy_object(Bucket=name, Key="crc-copy.bin", ChecksumAlgorithm="CRC32",
                               CopySource={"Bucket": name, "Key": "kept-sum.bin"})
        result = answer["CopyObjectResult"]
        check(result.get("ChecksumCRC32") == crc, f"CopyObjectResult {result}")
        again = a.head_object(Bucket=name, Key="crc-copy.bin", ChecksumMode="ENABLED")
        check(again.get("ChecksumCRC32") == crc and "ChecksumSHA256" not in again,
              f"the copy's checksum {again}")
        a.copy_object(Bucket=name, Key="kept-sum.bin", ChecksumAlgorithm="CRC32",
                      CopySource={"Bucket": name, "Key": "kept-sum.bin"})
        in_place = a.head_object(Bucket=name, Key="kept-sum.bin", ChecksumMode="ENABLED")
        check(in_place.get("ChecksumCRC32") == crc, f"an in-place copy's checksum {in_place}")
        # boto3's default upload sends a CRC32 trailer: that one is kept too.
        a.put_object(Bucket=name, Key="default-sum.bin", Body=data)
        plain = a.head_object(Bucket=name, Key="default-sum.bin", ChecksumMode="ENABLED")
        check(plain.get("ChecksumCRC32") == crc32_b64(data),
              f"HEAD ChecksumCRC32 {plain.get('ChecksumCRC32')}, expected {crc32_b64(data)}")


LISTED = {
    "alpha.txt": b"alpha",
    "photos/2024/a.jpg": b"a" * 10,
    "photos/2024/b.jpg": b"b" * 20,
    "photos/2025/c.jpg": b"c" * 30,
    "photos/d.jpg": b"d" * 40,
    "with space/ünï ✓.txt": b"unicode",
    "zeta.txt": b"zeta",
}


def group_listing(suite):
    g = suite.group("listing")
    a = s3(A)
    name = bucket("listing")
    everything = utf8_sorted(LISTED)

    @g.setup("create_bucket_and_put_the_keys")
    def _():
        make_bucket(a, name)
        for key, data in LISTED.items():
            a.put_object(Bucket=name, Key=key, Body=data)

    @g.check("list_objects_v1_lists_every_key_in_order_with_etag_size_and_owner")
    def _():
        answer = a.list_objects(Bucket=name)
        check(keys_of(answer) == everything, f"keys {keys_of(answer)}, expected {everything}")
        check(answer.get("IsTruncated") is False, f"IsTruncated {answer.get('IsTruncated')}")
        for o in answer["Contents"]:
            data = LISTED[o["Key"]]
            check(o["ETag"] == etag_of(data) and o["Size"] == len(data),
                  f"{o['Key']}: ETag {o['ETag']} size {o['Size']}")
            check(o.get("StorageClass") == "STANDARD", f"{o['Key']}: {o.get('StorageClass')}")
            check(o.get("Owner", {}).get("ID") == OWNER.get("A"),
                  f"{o['Key']}: owner {o.get('Owner')}, expected {OWNER.get('A')}")

    @g.check("list_objects_v1_prefix_and_delimiter_roll_up_common_prefixes")
    def _():
        answer = a.list_objects(Bucket=name, Prefix="photos/", Delimiter="/")
        check(keys_of(answer) == ["photos/d.jpg"], f"keys {keys_of(answer)}")
        check(prefixes_of(answer) == ["photos/2024/", "photos/2025/"],
              f"CommonPrefixes {prefixes_of(answer)}")
        check(answer.get("Prefix") == "photos/" and answer.get("Delimiter") == "/",
              f"Prefix {answer.get('Prefix')!r} Delimiter {answer.get('Delimiter')!r}")

    @g.check("list_objects_v1_delimiter_at_the_root")
    def _():
        answer = a.list_objects(Bucket=name, Delimiter="/")
        check(keys_of(answer) == ["alpha.txt", "zeta.txt"], f"keys {keys_of(answer)}")
        check(prefixes_of(answer) == ["photos/", "with space/"],
              f"CommonPrefixes {prefixes_of(answer)}")

    @g.check("list_objects_with_max_keys_0_is_empty_and_not_truncated")
    def _():
        v1 = a.list_objects(Bucket=name, MaxKeys=0)
        check(not keys_of(v1) and v1.get("IsTruncated") is False,
              f"v1 keys {keys_of(v1)} truncated {v1.get('IsTruncated')}")
        v2 = a.list_objects_v2(Bucket=name, MaxKeys=0)
        check(not keys_of(v2) and v2.get("IsTruncated") is False and v2.get("KeyCount") == 0,
              f"v2 keys {keys_of(v2)} truncated {v2.get('IsTruncated')} count {v2.get('KeyCount')}")

    @g.check("list_objects_v1_max_keys_and_marker_page_through_every_key")
    def _():
        seen, marker, pages = [], "", 0
        while True:
            answer = a.list_objects(Bucket=name, MaxKeys=3, Marker=marker)
            pages += 1
            page = keys_of(answer)
            check(answer.get("MaxKeys") == 3, f"MaxKeys {answer.get('MaxKeys')}")
            check(len(page) <= 3, f"page {pages} has {len(page)} keys")
            seen += page
            if not answer.get("IsTruncated"):
                break
            check(page and pages < 10, f"page {pages} is truncated with keys {page}")
            marker = answer.get("NextMarker") or page[-1]
        check(seen == everything, f"pages of 3 gave {seen}, expected {everything}")
        check(pages == 3, f"{len(everything)} keys in pages of 3 took {pages} pages")

    @g.check("list_objects_v1_marker_starts_after_it")
    def _():
        answer = a.list_objects(Bucket=name, Marker="photos/2025/c.jpg")
        expected = [k for k in everything if k.encode() > b"photos/2025/c.jpg"]
        check(keys_of(answer) == expected, f"keys {keys_of(answer)}, expected {expected}")

    @g.check("list_objects_v1_with_delimiter_pages_by_next_marker")
    def _():
        items, marker, pages = [], "", 0
        while True:
            answer = a.list_objects(Bucket=name, Delimiter="/", MaxKeys=1, Marker=marker)
            pages += 1
            page = keys_of(answer) + prefixes_of(answer)
            check(len(page) <= 1, f"page {pages} with MaxKeys 1 holds {page}")
            items += page
            if not answer.get("IsTruncated"):
                break
            check(answer.get("NextMarker") and pages < 10,
                  f"page {pages} is truncated, NextMarker {answer.get('NextMarker')!r}")
            marker = answer["NextMarker"]
        expected = ["alpha.txt", "photos/", "with space/", "zeta.txt"]
        check(sorted(items) == expected and len(items) == len(set(items)),
              f"pages by NextMarker gave {items}, expected {expected}")

    @g.check("list_objects_v1_paginator_sees_every_key_once")
    def _():
        seen = []
        for page in a.get_paginator("list_objects").paginate(
                Bucket=name, PaginationConfig={"PageSize": 2}):
            seen += keys_of(page)
        check(seen == everything, f"the paginator saw {seen}")

    @g.check("list_objects_v2_continuation_tokens_page_through_every_key_with_key_count")
    def _():
        seen, token, pages = [], None, 0
        while True:
            params = {"Bucket": name, "MaxKeys": 3}
            if token:
                params["ContinuationToken"] = token
            answer = a.list_objects_v2(**params)
            pages += 1
            page = keys_of(answer)
            check(answer.get("KeyCount") == len(page),
                  f"page {pages}: KeyCount {answer.get('KeyCount')} for {len(page)} keys")
            if token:
                check(answer.get("ContinuationToken") == token,
                      f"page {pages} echoes ContinuationToken {answer.get('ContinuationToken')!r}")
            seen += page
            if not answer.get("IsTruncated"):
                check("NextContinuationToken" not in answer, "the last page has a next token")
                break
            token = answer.get("NextContinuationToken")
            check(token and pages < 10, f"page {pages} is truncated without a next token")
        check(seen == everything, f"pages of 3 gave {seen}, expected {everything}")
        check(pages == 3, f"{len(everything)} keys in pages of 3 took {pages} pages")

    @g.check("list_objects_v2_start_after")
    def _():
        answer = a.list_objects_v2(Bucket=name, StartAfter="photos/2024/b.jpg")
        expected = [k for k in everything if k.encode() > b"photos/2024/b.jpg"]
        check(keys_of(answer) == expected, f"keys {keys_of(answer)}, expected {expected}")
        check(answer.get("StartAfter") == "photos/2024/b.jpg",
              f"StartAfter echoed as {answer.get('StartAfter')!r}")

    @g.check("list_objects_v2_prefix_and_delimiter_count_keys_and_prefixes")
    def _():
        answer = a.list_objects_v2(Bucket=name, Prefix="photos/", Delimiter="/")
        check(keys_of(answer) == ["photos/d.jpg"], f"keys {keys_of(answer)}")
        check(prefixes_of(answer) == ["photos/2024/", "photos/2025/"],
              f"CommonPrefixes {prefixes_of(answer)}")
        check(answer.get("KeyCount") == 3, f"KeyCount {answer.get('KeyCount')}, expected 3")

    @g.check("list_objects_v2_prefix_matching_nothing_is_empty")
    def _():
        answer = a.list_objects_v2(Bucket=name, Prefix="nothing/")
        check(keys_of(answer) == [] and answer.get("KeyCount") == 0
              and answer.get("IsTruncated") is False, f"answer {brief(answer)}")

    @g.check("list_objects_v2_encoding_type_url_encodes_keys_and_prefixes")
    def _():
        # Asked explicitly, botocore leaves the answer encoded (it decodes only what it asked).
        answer = a.list_objects_v2(Bucket=name, EncodingType="url")
        check(answer.get("EncodingType") == "url", f"EncodingType {answer.get('EncodingType')!r}")
        raw = keys_of(answer)
        decoded = [unquote_plus(k) for k in raw]
        check(decoded == everything, f"decoded keys {decoded}, expected {everything}")
        encoded = raw[everything.index("with space/ünï ✓.txt")]
        check(encoded.isascii() and " " not in encoded,
              f"the key with a space and unicode came back as {encoded!r}")
        answer = a.list_objects_v2(Bucket=name, EncodingType="url", Delimiter="/")
        prefixes = prefixes_of(answer)
        check([unquote_plus(p) for p in prefixes] == ["photos/", "with space/"]
              and all(" " not in p for p in prefixes), f"CommonPrefixes {prefixes}")

    @g.check("list_objects_with_an_unknown_encoding_type_is_invalid_argument")
    def _():
        for call in (a.list_objects_v2, a.list_objects, a.list_object_versions,
                     a.list_multipart_uploads):
            expect_error("InvalidArgument", 400, call, Bucket=name, EncodingType="foo")

    @g.check("list_objects_v2_fetch_owner")
    def _():
        answer = a.list_objects_v2(Bucket=name, FetchOwner=True, MaxKeys=1)
        owner = answer["Contents"][0].get("Owner", {}).get("ID")
        check(owner == OWNER.get("A"), f"owner {owner}, expected {OWNER.get('A')}")

    @g.check("list_object_versions_of_an_unversioned_bucket_are_null_and_latest")
    def _():
        answer = a.list_object_versions(Bucket=name)
        versions = answer.get("Versions", [])
        check([v["Key"] for v in versions] == everything,
              f"versions of {[v['Key'] for v in versions]}, expected {everything}")
        for v in versions:
            check(v.get("VersionId") == "null" and v.get("IsLatest") is True,
                  f"{v['Key']}: VersionId {v.get('VersionId')!r} IsLatest {v.get('IsLatest')}")
            check(v.get("ETag") == etag_of(LISTED[v["Key"]]) and v.get("Size") == len(
                LISTED[v["Key"]]), f"{v['Key']}: {brief(v)}")
        check(not answer.get("DeleteMarkers"), f"DeleteMarkers {answer.get('DeleteMarkers')}")


def group_multipart(suite):
    g = suite.group("multipart")
    a = s3(A)
    name = bucket("multipart")
    parts = [os.urandom(5 * MIB), os.urandom(5 * MIB), os.urandom(1234)]
    st = {"etags": {}}

    @g.setup("create_bucket")
    def _():
        make_bucket(a, name)

    @g.setup("create_multipart_upload_answers_an_upload_id")
    def _():
        answer = a.create_multipart_upload(Bucket=name, Key="big.bin",
                                           ContentType="application/x-test",
                                           Metadata={"stage": "multipart"})
        check(answer.get("UploadId") and answer.get("Key") == "big.bin"
              and answer.get("Bucket") == name, f"answer {brief(answer)}")
        st["id"] = answer["UploadId"]

    @g.setup("upload_part_of_5_mib_parts_answers_their_md5_etags")
    def _():
        for number, data in enumerate(parts, start=1):
            answer = a.upload_part(Bucket=name, Key="big.bin", UploadId=st["id"],
                                   PartNumber=number, Body=data)
            check(answer["ETag"] == etag_of(data), f"part {number}: ETag {answer['ETag']}")
            st["etags"][number] = answer["ETag"]

    @g.check("list_parts_shows_each_part_with_its_size_and_etag")
    def _():
        answer = a.list_parts(Bucket=name, Key="big.bin", UploadId=st["id"])
        got = [(p["PartNumber"], p["ETag"], p["Size"]) for p in answer.get("Parts", [])]
        expected = [(i, etag_of(p), len(p)) for i, p in enumerate(parts, start=1)]
        check(got == expected, f"parts {got}, expected {expected}")

    @g.check("list_parts_pages_by_part_number_marker")
    def _():
        first = a.list_parts(Bucket=name, Key="big.bin", UploadId=st["id"], MaxParts=2)
        check([p["PartNumber"] for p in first.get("Parts", [])] == [1, 2]
              and first.get("IsTruncated") is True
              and str(first.get("NextPartNumberMarker")) == "2", f"first page {brief(first)}")
        rest = a.list_parts(Bucket=name, Key="big.bin", UploadId=st["id"], MaxParts=2,
                            PartNumberMarker=2)
        check([p["PartNumber"] for p in rest.get("Parts", [])] == [3]
              and rest.get("IsTruncated") is False, f"second page {brief(rest)}")

    @g.check("list_multipart_uploads_shows_the_upload")
    def _():
        answer = a.list_multipart_uploads(Bucket=name)
        got = [(u["Key"], u["UploadId"]) for u in answer.get("Uploads", [])]
        check(("big.bin", st["id"]) in got, f"uploads {got}")

    @g.check("upload_part_again_replaces_the_part")
    def _():
        again = os.urandom(2000)
        answer = a.upload_part(Bucket=name, Key="big.bin", UploadId=st["id"], PartNumber=3,
                               Body=again)
        check(answer["ETag"] == etag_of(again), f"ETag {answer['ETag']}")
        listed = a.list_parts(Bucket=name, Key="big.bin", UploadId=st["id"])["Parts"]
        check([(p["PartNumber"], p["ETag"]) for p in listed][-1] == (3, etag_of(again))
              and len(listed) == 3, f"parts after re-uploading part 3: {listed}")
        parts[2] = again
        st["etags"][3] = answer["ETag"]

    @g.setup("complete_multipart_upload_answers_the_md5_of_md5s_etag")
    def _():
        answer = a.complete_multipart_upload(
            Bucket=name, Key="big.bin", UploadId=st["id"],
            MultipartUpload={"Parts": [{"PartNumber": i, "ETag": st["etags"][i]}
                                       for i in (1, 2, 3)]},
        )
        check(answer.get("ETag") == multipart_etag(parts),
              f"ETag {answer.get('ETag')}, expected {multipart_etag(parts)}")
        check(answer.get("Key") == "big.bin" and answer.get("Bucket") == name,
              f"answer {brief(answer)}")
        # An absolute URL, as AWS answers (SDKs hand it to applications as the object's URL).
        location = answer.get("Location", "")
        check(location.startswith("https://") and location.endswith("/big.bin")
              and name in location, f"Location {location!r}")
        st["location"] = location

    @g.check("a_retried_completion_of_a_completed_upload_answers_as_the_first")
    def _():
        # What a client whose first answer was lost sends again.
        answer = a.complete_multipart_upload(
            Bucket=name, Key="big.bin", UploadId=st["id"],
            MultipartUpload={"Parts": [{"PartNumber": i, "ETag": st["etags"][i]}
                                       for i in (1, 2, 3)]},
        )
        check(answer.get("ETag") == multipart_etag(parts), f"ETag {answer.get('ETag')}")
        check(answer.get("Location") == st["location"], f"Location {answer.get('Location')!r}")
        # Another upload's ID is still unknown.
        expect_error("NoSuchUpload", 404, a.complete_multipart_upload, Bucket=name,
                     Key="big.bin", UploadId="not-an-upload",
                     MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": st["etags"][1]}]})

    @g.check("completed_object_has_the_parts_bytes_metadata_and_etag")
    def _():
        got = a.get_object(Bucket=name, Key="big.bin")
        data = got["Body"].read()
        whole = b"".join(parts)
        check(len(data) == len(whole) and data == whole,
              f"{len(data)} bytes (md5 {md5hex(data)}), expected {len(whole)} ({md5hex(whole)})")
        check(got["ETag"] == multipart_etag(parts), f"ETag {got['ETag']}")
        check(got.get("ContentType") == "application/x-test", f"type {got.get('ContentType')}")
        check(got.get("Metadata") == {"stage": "multipart"}, f"metadata {got.get('Metadata')}")

    @g.check("get_object_range_across_a_part_boundary")
    def _():
        start = 5 * MIB - 5
        answer = a.get_object(Bucket=name, Key="big.bin", Range=f"bytes={start}-{start + 9}")
        check(answer["Body"].read() == b"".join(parts)[start:start + 10],
              "the bytes across parts 1 and 2 differ")

    @g.check("get_and_head_with_part_number_serve_one_part_as_uploaded")
    def _():
        whole = b"".join(parts)
        plain = a.get_object(Bucket=name, Key="big.bin")
        plain["Body"].read()
        check("PartsCount" not in plain, f"a whole GET reports PartsCount {plain.get('PartsCount')}")
        start = 0
        for n, part in enumerate(parts, start=1):
            got = a.get_object(Bucket=name, Key="big.bin", PartNumber=n)
            data = got["Body"].read()
            status = got["ResponseMetadata"]["HTTPStatusCode"]
            end = start + len(part) - 1
            check(status == 206 and data == part,
                  f"part {n}: HTTP {status}, {len(data)} bytes, expected {len(part)}")
            check(got.get("ContentRange") == f"bytes {start}-{end}/{len(whole)}"
                  and got.get("PartsCount") == len(parts) and got["ETag"] == multipart_etag(parts),
                  f"part {n}: {brief(got)}")
            head = a.head_object(Bucket=name, Key="big.bin", PartNumber=n)
            check(head["ResponseMetadata"]["HTTPStatusCode"] == 206
                  and head["ContentLength"] == len(part) and head.get("PartsCount") == len(parts),
                  f"HEAD of part {n}: {brief(head)}")
            start += len(part)
        expect_error("InvalidPartNumber", 416, a.get_object, Bucket=name, Key="big.bin",
                     PartNumber=len(parts) + 1)
        expect_error("InvalidArgument", 400, a.get_object, Bucket=name, Key="big.bin",
                     PartNumber=0)
        expect_error("InvalidRequest", 400, a.get_object, Bucket=name, Key="big.bin",
                     PartNumber=1, Range="bytes=0-9")
        a.put_object(Bucket=name, Key="one-part.txt", Body=b"a single PUT")
        got = a.get_object(Bucket=name, Key="one-part.txt", PartNumber=1)
        check(got["Body"].read() == b"a single PUT" and got.get("PartsCount") == 1,
              f"part 1 of a single PUT: {brief(got)}")
        expect_error("InvalidPartNumber", 416, a.get_object, Bucket=name, Key="one-part.txt",
                     PartNumber=2)

    @g.check("put_object_with_a_bucket_owner_canned_acl_is_private")
    def _():
        for canned in ["bucket-owner-full-control", "bucket-owner-read"]:
            a.put_object(Bucket=name, Key=f"{canned}.txt", Body=b"owner", ACL=canned)
            check_acl(a.get_object_acl(Bucket=name, Key=f"{canned}.txt"), "private", canned)

    @g.check("list_multipart_uploads_no_longer_shows_a_completed_upload")
    def _():
        answer = a.list_multipart_uploads(Bucket=name)
        check(all(u["UploadId"] != st["id"] for u in answer.get("Uploads", [])),
              f"uploads {answer.get('Uploads')}")

    @g.check("upload_part_copy_of_a_range_and_of_a_whole_object")
    def _():
        source = os.urandom(6 * MIB)
        a.put_object(Bucket=name, Key="copy-source.bin", Body=source)
        a.put_object(Bucket=name, Key="small.txt", Body=b"the small tail")
        upload = a.create_multipart_upload(Bucket=name, Key="copied.bin")["UploadId"]
        first = a.upload_part_copy(Bucket=name, Key="copied.bin", UploadId=upload, PartNumber=1,
                                   CopySource={"Bucket": name, "Key": "copy-source.bin"},
                                   CopySourceRange=f"bytes=0-{5 * MIB - 1}")
        check(first["CopyPartResult"]["ETag"] == etag_of(source[:5 * MIB]),
              f"part 1 ETag {first['CopyPartResult']['ETag']}")
        second = a.upload_part_copy(Bucket=name, Key="copied.bin", UploadId=upload, PartNumber=2,
                                    CopySource={"Bucket": name, "Key": "small.txt"})
        check(second["CopyPartResult"]["ETag"] == etag_of(b"the small tail"),
              f"part 2 ETag {second['CopyPartResult']['ETag']}")
        done = a.complete_multipart_upload(
            Bucket=name, Key="copied.bin", UploadId=upload,
            MultipartUpload={"Parts": [
                {"PartNumber": 1, "ETag": first["CopyPartResult"]["ETag"]},
                {"PartNumber": 2, "ETag": second["CopyPartResult"]["ETag"]},
            ]},
        )
        expected = [source[:5 * MIB], b"the small tail"]
        check(done["ETag"] == multipart_etag(expected), f"ETag {done['ETag']}")
        check(body_of(a, name, "copied.bin") == b"".join(expected), "the copied bytes differ")

    @g.check("upload_part_copy_of_a_range_past_the_source_or_open_ended_is_invalid_argument")
    def _():
        a.put_object(Bucket=name, Key="hundred.bin", Body=os.urandom(100))
        upload = a.create_multipart_upload(Bucket=name, Key="short.bin")["UploadId"]
        source = {"Bucket": name, "Key": "hundred.bin"}
        for text in ["bytes=0-199", "bytes=50-", "bytes=-10"]:
            expect_error("InvalidArgument", 400, a.upload_part_copy, Bucket=name, Key="short.bin",
                         UploadId=upload, PartNumber=1, CopySource=source,
                         CopySourceRange=text)
        parts = a.list_parts(Bucket=name, Key="short.bin", UploadId=upload)
        check(not parts.get("Parts"), f"a refused copy stored a part: {parts.get('Parts')}")
        a.abort_multipart_upload(Bucket=name, Key="short.bin", UploadId=upload)

    @g.check("a_put_or_part_announced_over_5_gib_is_entity_too_large_before_its_body")
    def _():
        # Content-Length says 5 GiB + 1; only 4 bytes follow. The answer must come without the
        # rest (the request would otherwise wait out the 60 s timeout), and nothing is stored.
        upload = a.create_multipart_upload(Bucket=name, Key="huge.bin")["UploadId"]
        too_large = 5 * 1024 * MIB + 1
        for what, query in [("PUT", ""),
                            ("UploadPart", "partNumber=1&uploadId=" + quote(upload, safe=""))]:
            reply = raw_request(A, "PUT", object_path(name, "huge.bin"), body=b"four",
                                payload_hash="UNSIGNED-PAYLOAD", content_length=too_large,
                                query=query)
            check(reply.status == 400 and xml_code(reply.body) == "EntityTooLarge",
                  f"{what}: HTTP {reply.status} {xml_code(reply.body)}, "
                  f"expected 400 EntityTooLarge")
        check(not exists(a, name, "huge.bin"), "the refused PUT stored an object")
        parts = a.list_parts(Bucket=name, Key="huge.bin", UploadId=upload)
        check(not parts.get("Parts"), f"the refused part was stored: {parts.get('Parts')}")
        a.abort_multipart_upload(Bucket=name, Key="huge.bin", UploadId=upload)

    @g.check("list_multipart_uploads_pages_list_every_upload_of_one_key_once")
    def _():
        made = [a.create_multipart_upload(Bucket=name, Key="paged-key")["UploadId"]
                for _ in range(3)]
        pages = a.get_paginator("list_multipart_uploads").paginate(
            Bucket=name, Prefix="paged-key", PaginationConfig={"PageSize": 1})
        listed = [u["UploadId"] for page in pages for u in page.get("Uploads", [])]
        check(len(listed) == 3 and sorted(listed) == sorted(made), f"listed {listed}, made {made}")
        for upload_id in made:
            a.abort_multipart_upload(Bucket=name, Key="paged-key", UploadId=upload_id)

    @g.check("list_multipart_uploads_encoding_type_url_encodes_markers_prefix_and_keys")
    def _():
        key = "multi space/\u00fc.bin"
        upload_id = a.create_multipart_upload(Bucket=name, Key=key)["UploadId"]
        # Asked explicitly, botocore leaves every field of the answer as the server wrote it.
        answer = a.list_multipart_uploads(Bucket=name, EncodingType="url", Prefix="multi space/",
                                          KeyMarker="multi space/a", Delimiter="\u00e9")
        keys = [u["Key"] for u in answer.get("Uploads", [])]
        check(keys == ["multi%20space/%C3%BC.bin"], f"Uploads keys {keys}")
        check(answer.get("KeyMarker") == "multi%20space/a",
              f"KeyMarker {answer.get('KeyMarker')!r}")
        check(answer.get("Prefix") == "multi%20space/", f"Prefix {answer.get('Prefix')!r}")
        check(answer.get("Delimiter") == "%C3%A9", f"Delimiter {answer.get('Delimiter')!r}")
        a.abort_multipart_upload(Bucket=name, Key=key, UploadId=upload_id)

    @g.check("upload_part_copy_whose_source_conditions_fail_is_precondition_failed")
    def _():
        a.put_object(Bucket=name, Key="cond-source.txt", Body=b"condition source")
        upload = a.create_multipart_upload(Bucket=name, Key="cond-copied.bin")["UploadId"]
        source = {"Bucket": name, "Key": "cond-source.txt"}
        expect_error("PreconditionFailed", 412, a.upload_part_copy, Bucket=name,
                     Key="cond-copied.bin", UploadId=upload, PartNumber=1, CopySource=source,
                     CopySourceIfMatch='"0123456789abcdef0123456789abcdef"')
        later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
        expect_error("PreconditionFailed", 412, a.upload_part_copy, Bucket=name,
                     Key="cond-copied.bin", UploadId=upload, PartNumber=1, CopySource=source,
                     CopySourceIfModifiedSince=later)
        parts = a.list_parts(Bucket=name, Key="cond-copied.bin", UploadId=upload)
        check(not parts.get("Parts"), f"a refused copy stored a part: {parts.get('Parts')}")
        a.abort_multipart_upload(Bucket=name, Key="cond-copied.bin", UploadId=upload)

    def upload(key, datas):
        upload_id = a.create_multipart_upload(Bucket=name, Key=key)["UploadId"]
        etags = [
            a.upload_part(Bucket=name, Key=key, UploadId=upload_id, PartNumber=i,
                          Body=d)["ETag"]
            for i, d in enumerate(datas, start=1)
        ]
        return upload_id, etags

    def complete_multipart_upload(key, upload_id, numbered_etags):
        return a.complete_multipart_upload(
            Bucket=name, Key=key, UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in numbered_etags]},
        )

    @g.check("complete_with_a_part_under_5_mib_before_the_last_is_entity_too_small")
    def _():
        upload_id, etags = upload("small-parts.bin", [b"1" * KIB, b"2" * KIB])
        expect_error("EntityTooSmall", 400, complete_multipart_upload, "small-parts.bin", upload_id,
                     list(enumerate(etags, start=1)))
        a.abort_multipart_upload(Bucket=name, Key="small-parts.bin", UploadId=upload_id)
        check(not exists(a, name, "small-parts.bin"), "the refused upload is visible")

    @g.check("complete_with_a_wrong_etag_or_a_missing_part_is_invalid_part")
    def _():
        upload_id, etags = upload("wrong-etag.bin", [b"only part"])
        expect_error("InvalidPart", 400, complete_multipart_upload, "wrong-etag.bin", upload_id,
                     [(1, etag_of(b"not this"))])
        expect_error("InvalidPart", 400, complete_multipart_upload, "wrong-etag.bin", upload_id,
                     [(1, etags[0]), (2, etag_of(b"never uploaded"))])
        check(not exists(a, name, "wrong-etag.bin"), "the refused upload is visible")
        # A refused completion leaves the upload as it was: it still completes.
        complete_multipart_upload("wrong-etag.bin", upload_id, [(1, etags[0])])
        check(body_of(a, name, "wrong-etag.bin") == b"only part", "the completed bytes differ")

    @g.check("complete_with_parts_out_of_order_is_invalid_part_order")
    def _():
        # Both parts 5 MiB: in either order neither is too small.
        datas = [parts[0], parts[1]]
        upload_id, etags = upload("order.bin", datas)
        expect_error("InvalidPartOrder", 400, complete_multipart_upload, "order.bin", upload_id,
                     [(2, etags[1]), (1, etags[0])])
        check(not exists(a, name, "order.bin"), "the refused upload is visible")
        answer = complete_multipart_upload("order.bin", upload_id, [(1, etags[0]), (2, etags[1])])
        check(answer["ETag"] == multipart_etag(datas), f"ETag {answer['ETag']}")

    @g.check("upload_part_to_an_unknown_upload_id_is_no_such_upload")
    def _():
        expect_error("NoSuchUpload", 404, a.upload_part, Bucket=name, Key="big.bin",
                     UploadId=secrets.token_hex(16), PartNumber=1, Body=b"x")

    @g.check("abort_multipart_upload_forgets_the_upload_and_its_parts")
    def _():
        upload_id, _ = upload("aborted.bin", [b"part one"])
        answer = a.abort_multipart_upload(Bucket=name, Key="aborted.bin", UploadId=upload_id)
        check(status(answer) == 204, f"abort answered HTTP {status(answer)}")
        uploads = a.list_multipart_uploads(Bucket=name).get("Uploads", [])
        check(all(u["UploadId"] != upload_id for u in uploads), f"uploads {uploads}")
        expect_error("NoSuchUpload", 404, a.list_parts, Bucket=name, Key="aborted.bin",
                     UploadId=upload_id)
        expect_error("NoSuchUpload", 404, a.upload_part, Bucket=name, Key="aborted.bin",
                     UploadId=upload_id, PartNumber=2, Body=b"late")
        expect_error("NoSuchUpload", 404, complete_multipart_upload, "aborted.bin", upload_id,
                     [(1, etag_of(b"part one"))])
        check(not exists(a, name, "aborted.bin"), "the aborted upload is visible")


def group_presign(suite):
    g = suite.group("presign")
    a = s3(A)
    name = bucket("presign")
    content = b"presigned content\n" * 20

    @g.setup("create_bucket_and_object")
    def _():
        make_bucket(a, name)
        a.put_object(Bucket=name, Key="doc.txt", Body=content)

    def presigned(method, key, expires=300, client=None):
        url = (client or a).generate_presigned_url(
            method, Params={"Bucket": name, "Key": key}, ExpiresIn=expires)
        check("X-Amz-Signature=" in url and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url,
              f"not a SigV4 presigned URL: {url}")
        return url

    @g.check("boto3_presigned_get_url_works_with_curl")
    def _():
        reply = curl(presigned("get_object", "doc.txt"))
        check(reply.status == 200 and reply.body == content,
              f"HTTP {reply.status}, {len(reply.body)} bytes: {reply.body[:200]!r}")
        check(reply.headers.get("etag") == etag_of(content), f"ETag {reply.headers.get('etag')}")

    @g.check("boto3_presigned_put_url_works_with_curl")
    def _():
        path = write_file(os.path.join(TMP, "presign", "upload.txt"), b"uploaded by curl\n")
        reply = curl(presigned("put_object", "uploaded.txt"), "--upload-file", path)
        check(reply.status == 200, f"HTTP {reply.status}: {reply.body[:300]!r}")
        check(body_of(a, name, "uploaded.txt") == b"uploaded by curl\n", "stored bytes differ")

    @g.check("a_presigned_put_applies_the_metadata_tagging_and_acl_in_its_query")
    def _():
        # What the AWS SDK for JavaScript puts in a presigned PUT's query string.
        from botocore.auth import S3SigV4QueryAuth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials
        def presign(method, url):
            request = AWSRequest(method=method, url=url)
            S3SigV4QueryAuth(Credentials(A.access_key, A.secret_key), "s3", REGION,
                             expires=300).add_auth(request)
            return request.url

        query = "x-amz-meta-colour=blue&x-amz-tagging=team%3Dred&x-amz-acl=public-read"
        path = write_file(os.path.join(TMP, "presign", "meta.txt"), b"meta\n")
        # At the root and at the Eucalyptus path alike.
        for key, base in [("with-meta.txt", ENDPOINT),
                          ("with-meta-euca.txt", f"{ENDPOINT}/services/objectstorage")]:
            reply = curl(presign("PUT", f"{base}/{name}/{key}?{query}"), "--upload-file", path)
            check(reply.status == 200, f"{key}: HTTP {reply.status}: {reply.body[:300]!r}")
            head = a.head_object(Bucket=name, Key=key)
            check(head.get("Metadata") == {"colour": "blue"},
                  f"{key}: metadata {head.get('Metadata')}")
            tags = a.get_object_tagging(Bucket=name, Key=key)["TagSet"]
            check(tags == [{"Key": "team", "Value": "red"}], f"{key}: tags {tags}")
            grants = a.get_object_acl(Bucket=name, Key=key)["Grants"]
            check(any(g["Grantee"].get("URI", "").endswith("/AllUsers") for g in grants),
                  f"{key}: grants {grants}")
        # Encryption Karri cannot give is refused from a query as from a header.
        kms = "x-amz-server-side-encryption=aws%3Akms"
        reply = curl(presign("PUT", f"{ENDPOINT}/{name}/kms.txt?{kms}"), "--upload-file", path)
        curl_refused(reply, "NotImplemented", 501, "a presigned PUT asking for KMS")
        reply = curl(presign("POST", f"{ENDPOINT}/{name}/kms.txt?uploads&{kms}"), "-X", "POST")
        curl_refused(reply, "NotImplemented", 501, "a presigned multipart upload asking for KMS")

    @g.check("a_presigned_put_refuses_x_amz_headers_its_signature_does_not_cover")
    def _():
        # Whoever holds a presigned PUT URL must not turn it into a public copy of another
        # object: unsigned x-amz-* headers are refused, as AWS refuses them.
        a.put_object(Bucket=name, Key="private.txt", Body=b"private\n")
        url = presigned("put_object", "taken.txt")
        for extra in (["-H", f"x-amz-copy-source: /{name}/private.txt"],
                      ["-H", "x-amz-acl: public-read"],
                      ["-H", "x-amz-meta-added: yes"]):
            reply = curl(url, "-X", "PUT", "-H", "Content-Length: 0", *extra)
            curl_refused(reply, "AccessDenied", 403, f"a presigned PUT with {extra[1]}")
            check(b"<HeadersNotSigned>" in reply.body, f"no HeadersNotSigned: {reply.body[:300]!r}")
        check(not exists(a, name, "taken.txt"), "a refused presigned PUT stored an object")

    @g.check("a_browser_form_post_of_a_large_file_stores_it_over_http_1_1")
    def _():
        # A form made by boto3's generate_presigned_post, sent by curl over HTTP/1.1, whose body
        # arrives in pieces larger than 64 KiB: a file of short CRLF lines (a piece that ends
        # with a carriage return, then a large one) once failed as "failed to read file stream".
        lines = b"".join(b"line %08d of a text file.\r\n" % i for i in range(700 * 1024))
        data = lines[: 20 * 1024 * 1024]
        path = write_file(os.path.join(TMP, "presign", "form.txt"), data)
        form = a.generate_presigned_post(name, "form/large.txt", ExpiresIn=300)
        fields = []
        for field, value in form["fields"].items():
            fields += ["--form-string", f"{field}={value}"]
        for attempt in range(3):
            reply = curl(form["url"], "--http1.1", *fields, "--form", f"file=@{path}")
            check(reply.status == 204, f"attempt {attempt + 1}: HTTP {reply.status}: "
                  f"{reply.body[:300]!r}")
            stored = body_of(a, name, "form/large.txt")
            check(stored == data, f"attempt {attempt + 1}: stored {len(stored)} bytes, "
                  f"MD5 {md5hex(stored)}, sent {len(data)}, MD5 {md5hex(data)}")

    @g.check("presigned_url_with_a_changed_signature_is_signature_does_not_match")
    def _():
        url = presigned("get_object", "doc.txt")
        last = url[-1]
        reply = curl(url[:-1] + ("0" if last != "0" else "1"))
        curl_refused(reply, "SignatureDoesNotMatch", 403, "a changed signature")

    @g.check("presigned_url_for_another_key_than_signed_is_signature_does_not_match")
    def _():
        url = presigned("get_object", "doc.txt").replace("/doc.txt?", "/uploaded.txt?")
        curl_refused(curl(url), "SignatureDoesNotMatch", 403, "a URL whose key was changed")

    @g.check("expired_presigned_url_is_access_denied")
    def _():
        with clock(-3600):
            url = presigned("get_object", "doc.txt", expires=60)
        curl_refused(curl(url), "AccessDenied", 403, "a URL that expired 59 minutes ago")

    @g.check("presigned_url_valid_for_more_than_a_week_is_refused")
    def _():
        url = presigned("get_object", "doc.txt", expires=604801)
        curl_refused(curl(url), "AuthorizationQueryParametersError", 400,
                     "a URL valid for a week and a second")

    @g.check("version_2_presigned_url_is_refused")
    def _():
        url = (f"{ENDPOINT}/{name}/doc.txt?AWSAccessKeyId={A.access_key}"
               f"&Expires=4102444800&Signature=c2lnbmF0dXJl")
        curl_refused(curl(url), "InvalidRequest", 400, "a signature version 2 URL")

    @g.check("version_2_authorization_header_is_refused")
    def _():
        date = datetime.datetime.now(UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
        reply = curl(f"{ENDPOINT}/{name}/doc.txt", "-H", f"Date: {date}",
                     "-H", f"Authorization: AWS {A.access_key}:c2lnbmF0dXJl")
        curl_refused(reply, "InvalidRequest", 400, "a signature version 2 header")

    @g.check("presigned_url_of_another_account_for_a_private_object_is_access_denied")
    def _():
        curl_refused(curl(presigned("get_object", "doc.txt", client=s3(B))), "AccessDenied", 403,
                     "B's presigned URL for A's private object")

    @g.check("aws_s3_presign_url_works_with_curl")
    def _():
        done = aws("s3", "presign", f"s3://{name}/doc.txt", "--expires-in", "300")
        url = done.stdout.strip()
        check("X-Amz-Signature=" in url, f"aws s3 presign printed {url!r}")
        reply = curl(url)
        check(reply.status == 200 and reply.body == content,
              f"HTTP {reply.status}: {reply.body[:200]!r}")


def group_acl(suite):
    g = suite.group("acl")
    # Anonymous requests with plain bodies (the aws-chunked ones have a check of their own).
    a, b, anon = s3(A), s3(B), s3(anonymous=True, checksums="when_required")
    names = {canned: bucket(f"acl-{canned}") for canned in CANNED_GRANTS}
    private = names["private"]
    actors = {"anonymous": anon, "other_account": b}

    @g.setup("create_bucket_with_each_canned_acl_and_objects_with_each")
    def _():
        for canned, bucket_name in names.items():
            make_bucket(a, bucket_name, acl=canned)
            a.put_object(Bucket=bucket_name, Key="obj.txt", Body=b"object")
        for canned in CANNED_GRANTS:
            a.put_object(Bucket=private, Key=f"{canned}.txt", Body=canned.encode(), ACL=canned)

    def label(canned):
        return canned.replace("-", "_")

    for canned in CANNED_GRANTS:
        @g.check(f"get_bucket_acl_of_a_{label(canned)}_bucket")
        def _(canned=canned):
            check_acl(a.get_bucket_acl(Bucket=names[canned]), canned, f"{canned} bucket")

        @g.check(f"get_object_acl_of_a_{label(canned)}_object")
        def _(canned=canned):
            check_acl(a.get_object_acl(Bucket=private, Key=f"{canned}.txt"), canned,
                      f"{canned} object")

    # Which bucket ACL lets whom list its objects and write new ones.
    bucket_rules = {
        "private": {"anonymous": (False, False), "other_account": (False, False)},
        "public-read": {"anonymous": (True, False), "other_account": (True, False)},
        "public-read-write": {"anonymous": (True, True), "other_account": (True, True)},
        "authenticated-read": {"anonymous": (False, False), "other_account": (True, False)},
    }
    for canned, rules in bucket_rules.items():
        for actor, (can_list, can_write) in rules.items():
            verdict = "allowed" if can_list else "access_denied"

            @g.check(f"{actor}_list_objects_of_a_{label(canned)}_bucket_is_{verdict}")
            def _(canned=canned, actor=actor, can_list=can_list):
                client = actors[actor]
                if can_list:
                    answer = allowed(client.list_objects_v2, Bucket=names[canned])
                    check("obj.txt" in keys_of(answer), f"listed {keys_of(answer)}")
                else:
                    denied(client.list_objects_v2, Bucket=names[canned])

            verdict = "allowed" if can_write else "access_denied"

            @g.check(f"{actor}_put_object_into_a_{label(canned)}_bucket_is_{verdict}")
            def _(canned=canned, actor=actor, can_write=can_write):
                client = actors[actor]
                key = f"by-{actor}.txt"
                if can_write:
                    allowed(client.put_object, Bucket=names[canned], Key=key, Body=b"hi")
                    check(key in keys_of(a.list_objects_v2(Bucket=names[canned])),
                          f"{key} is not listed")
                else:
                    denied(client.put_object, Bucket=names[canned], Key=key, Body=b"hi")
                    check(not exists(a, names[canned], key), f"the refused {key} exists")

    @g.check("anonymous_get_object_of_a_private_object_in_a_public_read_bucket_is_denied")
    def _():
        denied(anon.get_object, Bucket=names["public-read"], Key="obj.txt")

    # Which object ACL lets whom read it (all in the private bucket).
    object_rules = {
        "private": {"anonymous": False, "other_account": False},
        "public-read": {"anonymous": True, "other_account": True},
        "public-read-write": {"anonymous": True, "other_account": True},
        "authenticated-read": {"anonymous": False, "other_account": True},
    }
    for canned, rules in object_rules.items():
        for actor, can_read in rules.items():
            verdict = "allowed" if can_read else "access_denied"

            @g.check(f"{actor}_get_object_of_a_{label(canned)}_object_is_{verdict}")
            def _(canned=canned, actor=actor, can_read=can_read):
                client = actors[actor]
                key = f"{canned}.txt"
                if can_read:
                    got = allowed(client.get_object, Bucket=private, Key=key)["Body"].read()
                    check(got == canned.encode(), f"read {got!r}")
                    allowed(client.head_object, Bucket=private, Key=key)
                else:
                    denied(client.get_object, Bucket=private, Key=key)
                    denied(client.head_object, Bucket=private, Key=key)

    @g.check("anonymous_curl_get_of_a_public_read_object_and_of_a_private_one")
    def _():
        reply = curl(f"{ENDPOINT}/{private}/public-read.txt")
        check(reply.status == 200 and reply.body == b"public-read",
              f"HTTP {reply.status}: {reply.body[:200]!r}")
        curl_refused(curl(f"{ENDPOINT}/{private}/private.txt"), "AccessDenied", 403,
                     "anonymous curl of a private object")

    @g.check("anonymous_get_object_acl_of_a_public_read_object_is_access_denied")
    def _():
        denied(anon.get_object_acl, Bucket=private, Key="public-read.txt")

    @g.check("anonymous_list_buckets_is_refused")
    def _():
        # Unsigned `GET /` is also the resource API's: any 401/403 will do, as long as it
        # lists nothing.
        code, got, e = error_of(anon.list_buckets)
        check(got in (401, 403), f"anonymous list_buckets failed with {code} (HTTP {got}): {e}")

    @g.check("put_bucket_acl_opens_and_closes_a_bucket_to_anonymous_listing")
    def _():
        a.put_bucket_acl(Bucket=private, ACL="public-read")
        check_acl(a.get_bucket_acl(Bucket=private), "public-read", "after put_bucket_acl")
        allowed(anon.list_objects_v2, Bucket=private)
        a.put_bucket_acl(Bucket=private, ACL="private")
        check_acl(a.get_bucket_acl(Bucket=private), "private", "after put_bucket_acl private")
        denied(anon.list_objects_v2, Bucket=private)

    @g.check("put_object_acl_opens_and_closes_an_object_to_anonymous_reads")
    def _():
        a.put_object_acl(Bucket=private, Key="private.txt", ACL="public-read")
        check_acl(a.get_object_acl(Bucket=private, Key="private.txt"), "public-read",
                  "after put_object_acl")
        allowed(anon.get_object, Bucket=private, Key="private.txt")
        a.put_object_acl(Bucket=private, Key="private.txt", ACL="private")
        denied(anon.get_object, Bucket=private, Key="private.txt")

    @g.check("grant_headers_that_amount_to_a_canned_acl_are_honoured_and_others_refused")
    def _():
        everyone = 'uri="http://acs.amazonaws.com/groups/global/AllUsers"'
        a.put_object(Bucket=private, Key="granted.txt", Body=b"granted", GrantRead=everyone)
        check_acl(a.get_object_acl(Bucket=private, Key="granted.txt"), "public-read",
                  "after put_object with GrantRead to AllUsers")
        allowed(anon.get_object, Bucket=private, Key="granted.txt")
        # PutObjectAcl with grant headers alone (no x-amz-acl, no body): the owner's own.
        owner_id = a.get_bucket_acl(Bucket=private)["Owner"]["ID"]
        a.put_object_acl(Bucket=private, Key="granted.txt",
                         GrantFullControl=f'id="{owner_id}"')
        denied(anon.get_object, Bucket=private, Key="granted.txt")
        # A grant to another account cannot be kept: refused, and nothing written.
        expect_error("NotImplemented", 501, a.put_object, Bucket=private, Key="other.txt",
                     Body=b"x", GrantRead='id="222222222222"')
        expect_error("NoSuchKey", 404, a.get_object, Bucket=private, Key="other.txt")
        expect_error("NotImplemented", 501, a.put_object_acl, Bucket=private,
                     Key="granted.txt", GrantRead='emailAddress="someone@example.com"')
        expect_error("InvalidRequest", 400, a.put_object, Bucket=private, Key="both.txt",
                     Body=b"x", ACL="private", GrantRead=everyone)

    @g.check("anonymous_curl_put_into_a_public_read_write_bucket_with_a_public_read_acl")
    def _():
        path = write_file(os.path.join(TMP, "acl", "anonymous.txt"), b"written by nobody\n")
        url = f"{ENDPOINT}/{names['public-read-write']}/curl-anonymous.txt"
        reply = curl(url, "--upload-file", path, "-H", "x-amz-acl: public-read")
        check(reply.status == 200, f"HTTP {reply.status}: {reply.body[:300]!r}")
        reply = curl(url)
        check(reply.status == 200 and reply.body == b"written by nobody\n",
              f"reading it back: HTTP {reply.status}: {reply.body[:200]!r}")

    @g.check("anonymous_boto3_aws_chunked_put_into_a_public_read_write_bucket_round_trips")
    def _():
        # Unsigned, botocore still sends aws-chunked with a CRC32 trailer (no x-amz-content-sha256).
        data = os.urandom(70 * KIB)
        chunked = s3(anonymous=True)
        allowed(chunked.put_object, Bucket=names["public-read-write"], Key="boto-anonymous.bin",
                Body=data, ACL="public-read")
        sent = last_sent(chunked)[2]
        check("aws-chunked" in sent.get("content-encoding", ""),
              f"botocore sent Content-Encoding {sent.get('content-encoding')!r}")
        got = body_of(anon, names["public-read-write"], "boto-anonymous.bin")
        check(got == data, f"read back {len(got)} bytes (md5 {md5hex(got)}), expected "
              f"{len(data)} ({md5hex(data)})")


def group_isolation(suite):
    g = suite.group("isolation")
    a, b, anon = s3(A), s3(B), s3(anonymous=True)
    mine, theirs, open_ = bucket("iso-a"), bucket("iso-b"), bucket("iso-open")
    st = {}

    @g.setup("accounts_a_and_b_make_their_buckets_and_objects")
    def _():
        make_bucket(a, mine)
        a.put_object(Bucket=mine, Key="secret.txt", Body=b"A's secret")
        a.put_object(Bucket=mine, Key="public.txt", Body=b"A's public", ACL="public-read")
        a.put_bucket_tagging(Bucket=mine, Tagging={"TagSet": [{"Key": "owner", "Value": "a"}]})
        a.put_object_tagging(Bucket=mine, Key="secret.txt",
                             Tagging={"TagSet": [{"Key": "k", "Value": "v"}]})
        st["upload"] = a.create_multipart_upload(Bucket=mine, Key="pending.bin")["UploadId"]
        make_bucket(a, open_, acl="public-read-write")
        make_bucket(b, theirs)
        b.put_object(Bucket=theirs, Key="b.txt", Body=b"B's object")

    tag_set = {"TagSet": [{"Key": "by", "Value": "b"}]}
    refused = [
        ("list_objects", b.list_objects, {"Bucket": mine}),
        ("list_objects_v2", b.list_objects_v2, {"Bucket": mine}),
        ("list_object_versions", b.list_object_versions, {"Bucket": mine}),
        ("head_bucket", b.head_bucket, {"Bucket": mine}),
        ("get_bucket_location", b.get_bucket_location, {"Bucket": mine}),
        ("get_object", b.get_object, {"Bucket": mine, "Key": "secret.txt"}),
        ("get_object_of_a_missing_key", b.get_object, {"Bucket": mine, "Key": "nope.txt"}),
        ("head_object", b.head_object, {"Bucket": mine, "Key": "secret.txt"}),
        ("put_object", b.put_object, {"Bucket": mine, "Key": "by-b.txt", "Body": b"b"}),
        ("copy_object_into_a_bucket", b.copy_object,
         {"Bucket": mine, "Key": "by-b.txt", "CopySource": {"Bucket": theirs, "Key": "b.txt"}}),
        ("copy_object_from_a_bucket", b.copy_object,
         {"Bucket": theirs, "Key": "stolen.txt",
          "CopySource": {"Bucket": mine, "Key": "secret.txt"}}),
        ("copy_object_of_a_missing_key_from_a_bucket", b.copy_object,
         {"Bucket": theirs, "Key": "probe.txt",
          "CopySource": {"Bucket": mine, "Key": "nope.txt"}}),
        ("create_multipart_upload", b.create_multipart_upload, {"Bucket": mine, "Key": "m.bin"}),
        ("list_multipart_uploads", b.list_multipart_uploads, {"Bucket": mine}),
        ("get_bucket_acl", b.get_bucket_acl, {"Bucket": mine}),
        ("put_bucket_acl", b.put_bucket_acl, {"Bucket": mine, "ACL": "public-read"}),
        ("get_object_acl", b.get_object_acl, {"Bucket": mine, "Key": "secret.txt"}),
        ("put_object_acl", b.put_object_acl,
         {"Bucket": mine, "Key": "secret.txt", "ACL": "public-read"}),
        ("get_bucket_tagging", b.get_bucket_tagging, {"Bucket": mine}),
        ("put_bucket_tagging", b.put_bucket_tagging, {"Bucket": mine, "Tagging": tag_set}),
        ("delete_bucket_tagging", b.delete_bucket_tagging, {"Bucket": mine}),
        ("get_object_tagging", b.get_object_tagging, {"Bucket": mine, "Key": "secret.txt"}),
        ("put_object_tagging", b.put_object_tagging,
         {"Bucket": mine, "Key": "secret.txt", "Tagging": tag_set}),
        ("delete_object_tagging", b.delete_object_tagging, {"Bucket": mine, "Key": "secret.txt"}),
        ("delete_object", b.delete_object, {"Bucket": mine, "Key": "secret.txt"}),
        ("delete_bucket", b.delete_bucket, {"Bucket": mine}),
    ]
    for label, call, params in refused:
        @g.check(f"other_account_{label}_is_access_denied")
        def _(call=call, params=params):
            denied(call, **params)

    @g.check("other_account_multipart_calls_on_an_upload_id_are_access_denied")
    def _():
        upload = st["upload"]
        denied(b.list_parts, Bucket=mine, Key="pending.bin", UploadId=upload)
        denied(b.upload_part, Bucket=mine, Key="pending.bin", UploadId=upload, PartNumber=1,
               Body=b"b")
        denied(b.abort_multipart_upload, Bucket=mine, Key="pending.bin", UploadId=upload)
        uploads = a.list_multipart_uploads(Bucket=mine).get("Uploads", [])
        check([u["UploadId"] for u in uploads] == [upload], f"A's uploads now {uploads}")

    @g.check("other_account_delete_objects_deletes_nothing")
    def _():
        try:
            answer = b.delete_objects(Bucket=mine, Delete={"Objects": [{"Key": "secret.txt"}]})
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            check(code == "AccessDenied", f"delete_objects failed with {code}")
        else:
            errors = [(x.get("Key"), x.get("Code")) for x in answer.get("Errors", [])]
            check(not answer.get("Deleted") and errors == [("secret.txt", "AccessDenied")],
                  f"delete_objects answered Deleted {answer.get('Deleted')} Errors {errors}")

    @g.check("after_the_refusals_a_still_has_its_bucket_objects_acl_and_tags")
    def _():
        check(body_of(a, mine, "secret.txt") == b"A's secret", "secret.txt changed")
        check(not exists(a, mine, "by-b.txt"), "B's refused write exists")
        check_acl(a.get_bucket_acl(Bucket=mine), "private", "A's bucket")
        check_acl(a.get_object_acl(Bucket=mine, Key="secret.txt"), "private", "secret.txt")
        tags = a.get_bucket_tagging(Bucket=mine)["TagSet"]
        check(tags == [{"Key": "owner", "Value": "a"}], f"bucket tags {tags}")
        tags = a.get_object_tagging(Bucket=mine, Key="secret.txt")["TagSet"]
        check(tags == [{"Key": "k", "Value": "v"}], f"object tags {tags}")
        check(not exists(b, theirs, "stolen.txt"), "B copied A's secret")

    @g.check("list_buckets_shows_each_account_only_its_own_buckets")
    def _():
        a_names = {x["Name"] for x in a.list_buckets()["Buckets"]}
        b_names = {x["Name"] for x in b.list_buckets()["Buckets"]}
        check({mine, open_} <= a_names and theirs not in a_names, f"A sees {sorted(a_names)}")
        check(theirs in b_names and not ({mine, open_} & b_names), f"B sees {sorted(b_names)}")

    @g.check("other_account_on_a_missing_bucket_is_no_such_bucket")
    def _():
        expect_error("NoSuchBucket", 404, b.list_objects_v2, Bucket=bucket("iso-missing"))

    @g.check("a_public_read_object_is_readable_by_the_other_account_and_anonymously")
    def _():
        check(body_of(b, mine, "public.txt") == b"A's public", "B read something else")
        check(body_of(anon, mine, "public.txt") == b"A's public", "anonymous read other bytes")
        denied(b.list_objects_v2, Bucket=mine)

    @g.check("a_public_read_write_bucket_is_writable_by_the_other_account")
    def _():
        allowed(b.put_object, Bucket=open_, Key="from-b.txt", Body=b"from B")
        check("from-b.txt" in keys_of(a.list_objects_v2(Bucket=open_)), "A does not list it")


def group_tagging(suite):
    g = suite.group("tagging")
    a = s3(A)
    name = bucket("tagging")
    tags = [{"Key": "env", "Value": "test"}, {"Key": "team", "Value": "storage"}]

    def by_key(tag_set):
        return sorted((t["Key"], t["Value"]) for t in tag_set)

    @g.setup("create_bucket")
    def _():
        make_bucket(a, name)

    @g.check("get_bucket_tagging_without_tags_is_no_such_tag_set")
    def _():
        expect_error("NoSuchTagSet", 404, a.get_bucket_tagging, Bucket=name)

    @g.check("put_bucket_tagging_then_get_answers_the_tags")
    def _():
        a.put_bucket_tagging(Bucket=name, Tagging={"TagSet": tags})
        got = a.get_bucket_tagging(Bucket=name)["TagSet"]
        check(by_key(got) == by_key(tags), f"tags {got}")

    @g.check("delete_bucket_tagging_removes_the_tags")
    def _():
        answer = a.delete_bucket_tagging(Bucket=name)
        check(status(answer) == 204, f"delete_bucket_tagging answered HTTP {status(answer)}")
        expect_error("NoSuchTagSet", 404, a.get_bucket_tagging, Bucket=name)

    @g.check("tags_follow_aws_rules_reserved_prefix_characters_and_any_script")
    def _():
        a.put_object(Bucket=name, Key="rules.txt", Body=b"x")
        bad = [
            ({"Key": "aws:k", "Value": "v"}, "a reserved prefix"),
            ({"Key": "AWS:k", "Value": "v"}, "a reserved prefix in capitals"),
            ({"Key": "a*b", "Value": "v"}, "a key with *"),
            ({"Key": "k", "Value": "v!"}, "a value with !"),
            ({"Key": "k" * 129, "Value": "v"}, "a 129-character key"),
        ]
        for tag, what in bad:
            e = expect_error("InvalidTag", 400, a.put_bucket_tagging, Bucket=name,
                             Tagging={"TagSet": [tag]})
            check(e.response["Error"]["Message"], f"bucket tag with {what}: no message")
            expect_error("InvalidTag", 400, a.put_object_tagging, Bucket=name, Key="rules.txt",
                         Tagging={"TagSet": [tag]})
        expect_error("NoSuchTagSet", 404, a.get_bucket_tagging, Bucket=name)
        good = [{"Key": "ключ 1", "Value": "значение +-=._:/@"}, {"Key": "empty", "Value": ""}]
        a.put_bucket_tagging(Bucket=name, Tagging={"TagSet": good})
        a.put_object_tagging(Bucket=name, Key="rules.txt", Tagging={"TagSet": good})
        got = a.get_object_tagging(Bucket=name, Key="rules.txt")["TagSet"]
        check(by_key(got) == by_key(good), f"tags {got}")
        a.delete_bucket_tagging(Bucket=name)
        # Concurrent tag changes of one object all succeed (the last one wins), as on S3: 50 at
        # once, over 50 connections, with no retries.
        from concurrent.futures import ThreadPoolExecutor
        wide = boto3.session.Session(
            aws_access_key_id=A.access_key, aws_secret_access_key=A.secret_key,
            region_name=REGION,
        ).client("s3", endpoint_url=ENDPOINT, verify=CA, config=Config(
            region_name=REGION, signature_version="s3v4", retries={"total_max_attempts": 1},
            max_pool_connections=50, s3={"addressing_style": "path"}))

        def tag(i):
            try:
                wide.put_object_tagging(Bucket=name, Key="rules.txt",
                                        Tagging={"TagSet": [{"Key": "n", "Value": str(i)}]})
                return None
            except ClientError as e:
                return e.response["Error"]["Code"]

        with ThreadPoolExecutor(max_workers=50) as pool:
            failed = [code for code in pool.map(tag, range(50)) if code]
        check(not failed, f"{len(failed)} of 50 concurrent tag changes failed: {failed[:3]}")
        last = a.get_object_tagging(Bucket=name, Key="rules.txt")["TagSet"]
        check(len(last) == 1 and last[0]["Key"] == "n", f"tags after the changes {last}")

    @g.check("put_object_with_a_tagging_header_tags_the_object")
    def _():
        a.put_object(Bucket=name, Key="tagged.txt", Body=b"x", Tagging="env=test&team=storage")
        got = a.get_object_tagging(Bucket=name, Key="tagged.txt")["TagSet"]
        check(by_key(got) == by_key(tags), f"tags {got}")

    @g.check("put_object_tagging_replaces_and_delete_object_tagging_clears")
    def _():
        a.put_object_tagging(Bucket=name, Key="tagged.txt",
                             Tagging={"TagSet": [{"Key": "only", "Value": "this"}]})
        got = a.get_object_tagging(Bucket=name, Key="tagged.txt")["TagSet"]
        check(by_key(got) == [("only", "this")], f"tags after put_object_tagging {got}")
        answer = a.delete_object_tagging(Bucket=name, Key="tagged.txt")
        check(status(answer) == 204, f"delete_object_tagging answered HTTP {status(answer)}")
        got = a.get_object_tagging(Bucket=name, Key="tagged.txt")["TagSet"]
        check(got == [], f"tags after delete_object_tagging {got}")
        check(body_of(a, name, "tagged.txt") == b"x", "tagging changed the bytes")

    @g.check("object_tagging_of_a_missing_key_is_no_such_key")
    def _():
        expect_error("NoSuchKey", 404, a.get_object_tagging, Bucket=name, Key="nope.txt")
        expect_error("NoSuchKey", 404, a.put_object_tagging, Bucket=name, Key="nope.txt",
                     Tagging={"TagSet": tags})


def group_errors(suite):
    g = suite.group("errors")
    name = bucket("errors")
    wrong_secret = s3(Keys(A.access_key, A.secret_key[:-4] + "XXXX"), checksums="when_required")
    unknown = s3(Keys("AKIK" + secrets.token_hex(8).upper(), A.secret_key))

    @g.setup("create_bucket")
    def _():
        make_bucket(s3(A), name)
        s3(A).put_object(Bucket=name, Key="k.txt", Body=b"k")

    @g.check("object_lock_and_appends_are_refused_and_nothing_is_written")
    def _():
        # Karri cannot lock an object or append to one: the request is refused rather than
        # done without the lock (deletable at once) or as an overwrite.
        a = s3(A)
        locked = bucket("locked")
        expect_error("NotImplemented", 501, a.create_bucket, Bucket=locked,
                     CreateBucketConfiguration={"LocationConstraint": REGION},
                     ObjectLockEnabledForBucket=True)
        expect_error("404", 404, a.head_bucket, Bucket=locked)
        until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=30)
        expect_error("InvalidRequest", 400, a.put_object, Bucket=name, Key="locked.txt",
                     Body=b"x", ObjectLockMode="COMPLIANCE", ObjectLockRetainUntilDate=until)
        expect_error("InvalidRequest", 400, a.put_object, Bucket=name, Key="locked.txt",
                     Body=b"x", ObjectLockLegalHoldStatus="ON")
        check(not exists(a, name, "locked.txt"), "a refused locked PUT stored an object")
        expect_error("NotImplemented", 501, a.put_object, Bucket=name, Key="k.txt",
                     Body=b"appended", WriteOffsetBytes=1)
        check(body_of(a, name, "k.txt") == b"k", "a refused append changed the object")

    @g.check("a_wrong_secret_is_signature_does_not_match")
    def _():
        expect_error("SignatureDoesNotMatch", 403, wrong_secret.list_buckets)
        expect_error("SignatureDoesNotMatch", 403, wrong_secret.get_object, Bucket=name,
                     Key="k.txt")
        expect_error("SignatureDoesNotMatch", 403, wrong_secret.put_object, Bucket=name,
                     Key="w.txt", Body=b"w")
        check(not exists(s3(A), name, "w.txt"), "the refused upload exists")

    @g.check("an_unknown_access_key_is_invalid_access_key_id")
    def _():
        expect_error("InvalidAccessKeyId", 403, unknown.list_buckets)
        expect_error("InvalidAccessKeyId", 403, unknown.get_object, Bucket=name, Key="k.txt")

    @g.check("an_error_answered_before_the_body_is_read_leaves_the_connection_usable")
    def _():
        # An answer sent before the request body was read (here InvalidBucketName) must either
        # say `Connection: close` or leave the connection able to carry the next request:
        # clients put it back in their pool (boto3 then fails the next call on it).
        conn = http.client.HTTPSConnection(
            HOST, PORT, context=ssl.create_default_context(cafile=CA), timeout=30)
        try:
            body = (f"<CreateBucketConfiguration><LocationConstraint>{REGION}"
                    "</LocationConstraint></CreateBucketConfiguration>").encode()
            conn.request("PUT", "/ab", body=body, headers=signed_headers(A, "PUT", "/ab", body))
            first = conn.getresponse()
            first.read()
            check(first.status == 400, f"PUT /ab answered HTTP {first.status}")
            if (first.getheader("connection") or "").lower() == "close":
                return
            try:
                conn.request("GET", "/", headers=signed_headers(A, "GET", "/", b""))
                second = conn.getresponse()
                second.read()
            except (OSError, http.client.HTTPException) as e:
                raise Failure(
                    f"the gateway closed the connection after answering HTTP {first.status} "
                    f"to a request whose body it had not read, without `Connection: close`: "
                    f"the next request on it failed ({type(e).__name__}: {e})"
                ) from None
            check(second.status == 200, f"the next request answered HTTP {second.status}")
        finally:
            conn.close()

    @g.check("a_request_signed_an_hour_ago_is_request_time_too_skewed")
    def _():
        with clock(-3600):
            expect_error("RequestTimeTooSkewed", 403, s3(A).get_object, Bucket=name, Key="k.txt")

    @g.check("user_metadata_over_2_kib_is_metadata_too_large_and_stores_nothing")
    def _():
        big = {"note": "x" * 2100}
        expect_error("MetadataTooLarge", 400, s3(A).put_object, Bucket=name, Key="big-meta",
                     Body=b"m", Metadata=big)
        check(not exists(s3(A), name, "big-meta"), "the refused upload exists")
        expect_error("MetadataTooLarge", 400, s3(A).copy_object, Bucket=name, Key="big-copy",
                     CopySource={"Bucket": name, "Key": "k.txt"}, MetadataDirective="REPLACE",
                     Metadata=big)
        check(not exists(s3(A), name, "big-copy"), "the refused copy exists")
        expect_error("MetadataTooLarge", 400, s3(A).create_multipart_upload, Bucket=name,
                     Key="big-multi", Metadata=big)
        allowed(s3(A).put_object, Bucket=name, Key="meta-ok", Body=b"m",
                Metadata={"note": "x" * 1900})

    @g.check("more_than_10_object_tags_are_refused")
    def _():
        eleven = "&".join(f"t{i}=v" for i in range(11))
        expect_error("BadRequest", 400, s3(A).put_object, Bucket=name, Key="tagged", Body=b"t",
                     Tagging=eleven)
        tags = {"TagSet": [{"Key": f"t{i}", "Value": "v"} for i in range(11)]}
        expect_error("BadRequest", 400, s3(A).put_object_tagging, Bucket=name, Key="k.txt",
                     Tagging=tags)
        check(s3(A).get_object_tagging(Bucket=name, Key="k.txt")["TagSet"] == [],
              "the refused tags were stored")

    @g.check("a_version_id_other_than_null_is_invalid_argument_and_deletes_nothing")
    def _():
        other = "3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY"
        expect_error("InvalidArgument", 400, s3(A).get_object, Bucket=name, Key="k.txt",
                     VersionId=other)
        expect_error("InvalidArgument", 400, s3(A).delete_object, Bucket=name, Key="k.txt",
                     VersionId=other)
        answer = s3(A).delete_objects(Bucket=name, Delete={
            "Objects": [{"Key": "k.txt", "VersionId": other}]})
        codes = [(e.get("Key"), e.get("Code")) for e in answer.get("Errors", [])]
        check(codes == [("k.txt", "InvalidArgument")], f"delete_objects answered {brief(answer)}")
        check(body_of(s3(A), name, "k.txt") == b"k", "k.txt is gone")
        check(body_of(s3(A), name, "k.txt", VersionId="null") == b"k",
              "the null version is not served")

    @g.check("an_anonymous_get_may_not_override_response_headers")
    def _():
        s3(A).put_object(Bucket=name, Key="public.txt", Body=b"<p>", ACL="public-read")
        anon = s3(anonymous=True)
        check(body_of(anon, name, "public.txt") == b"<p>", "the public object is not served")
        expect_error("InvalidRequest", 400, anon.get_object, Bucket=name, Key="public.txt",
                     ResponseContentType="text/html")
        shown = s3(A).get_object(Bucket=name, Key="public.txt", ResponseContentType="text/html")
        check(shown["ContentType"] == "text/html", f"a signed override: {shown['ContentType']}")

    @g.check("an_expected_bucket_owner_that_is_another_account_is_access_denied")
    def _():
        check(OWNER.get("A") and OWNER.get("B"), f"owners not known: {OWNER}")
        check(body_of(s3(A), name, "k.txt", ExpectedBucketOwner=OWNER["A"]) == b"k",
              "the owner's own expectation was refused")
        expect_error("AccessDenied", 403, s3(A).get_object, Bucket=name, Key="k.txt",
                     ExpectedBucketOwner=OWNER["B"])
        expect_error("AccessDenied", 403, s3(A).put_object, Bucket=name, Key="w2.txt", Body=b"w",
                     ExpectedBucketOwner=OWNER["B"])
        check(not exists(s3(A), name, "w2.txt"), "the refused upload exists")
        expect_error("AccessDenied", 403, s3(A).copy_object, Bucket=name, Key="c2.txt",
                     CopySource={"Bucket": name, "Key": "k.txt"},
                     ExpectedSourceBucketOwner=OWNER["B"])

    @g.check("an_unknown_metadata_directive_is_invalid_argument")
    def _():
        expect_error("InvalidArgument", 400, s3(A).copy_object, Bucket=name, Key="c3.txt",
                     CopySource={"Bucket": name, "Key": "k.txt"}, MetadataDirective="MOVE")

    @g.check("completing_with_if_none_match_onto_an_existing_key_is_precondition_failed")
    def _():
        up = s3(A).create_multipart_upload(Bucket=name, Key="k.txt")["UploadId"]
        part = s3(A).upload_part(Bucket=name, Key="k.txt", UploadId=up, PartNumber=1,
                                 Body=b"new")
        parts = {"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]}
        expect_error("PreconditionFailed", 412, s3(A).complete_multipart_upload, Bucket=name,
                     Key="k.txt", UploadId=up, MultipartUpload=parts, IfNoneMatch="*")
        check(body_of(s3(A), name, "k.txt") == b"k", "the refused completion replaced k.txt")
        uploads = s3(A).list_multipart_uploads(Bucket=name).get("Uploads", [])
        check(up in [u["UploadId"] for u in uploads], "the refused completion ended the upload")
        done = s3(A).complete_multipart_upload(Bucket=name, Key="k.txt", UploadId=up,
                                               MultipartUpload=parts)
        check(done["ETag"].endswith('-1"'), f"completed {brief(done)}")
        # A retry of the completion is answered as the first was.
        again = s3(A).complete_multipart_upload(Bucket=name, Key="k.txt", UploadId=up,
                                                MultipartUpload=parts)
        check(again["ETag"] == done["ETag"], f"the retry answered {brief(again)}")
        s3(A).put_object(Bucket=name, Key="k.txt", Body=b"k")


def virtual_host(bucket_name):
    return f"{bucket_name}.{DOMAIN}:{PORT}"


def group_virtual(suite):
    g = suite.group("virtual")
    name = bucket("virtual")
    v = s3(A, style="virtual", endpoint=VHOST_ENDPOINT)

    def check_virtual(client, what):
        method, url, _ = last_sent(client)
        host = urlsplit(url).netloc
        check(host == virtual_host(name), f"{what}: {method} {url} was not sent to the bucket's "
              f"host {virtual_host(name)}")

    @g.setup("the_certificate_covers_bucket_host_names")
    def _():
        host = f"{name}.{DOMAIN}"
        context = ssl.create_default_context(cafile=CA)
        try:
            with socket.create_connection(("127.0.0.1", PORT), timeout=10) as sock:
                with context.wrap_socket(sock, server_hostname=host):
                    pass
        except ssl.SSLCertVerificationError as e:
            raise Failure(
                f"TLS to {host} does not verify: {e.verify_message}. The serving certificate "
                f"must name *.{DOMAIN}; note that OpenSSL (Python, curl, s3cmd) ignores a "
                f"wildcard with a single label after it, such as *.localhost: the S3 domain "
                f"needs two labels (e.g. s3.localhost with *.s3.localhost)"
            ) from None

    @g.setup("boto3_create_bucket_addresses_the_bucket_by_host_name")
    def _():
        localhost_resolver.install()
        make_bucket(v, name)
        check_virtual(v, "create_bucket")
        check(status(s3(A).head_bucket(Bucket=name)) == 200, "path-style head_bucket")

    @g.check("boto3_put_get_and_head_object")
    def _():
        v.put_object(Bucket=name, Key="dir/obj.txt", Body=b"virtual bytes", Metadata={"a": "b"})
        check_virtual(v, "put_object")
        check(body_of(v, name, "dir/obj.txt") == b"virtual bytes", "get_object bytes differ")
        head = v.head_object(Bucket=name, Key="dir/obj.txt")
        check(head["ETag"] == etag_of(b"virtual bytes") and head["Metadata"] == {"a": "b"},
              f"head_object {brief(head)}")
        check(body_of(s3(A), name, "dir/obj.txt") == b"virtual bytes", "path-style get differs")

    @g.check("boto3_list_objects_v1_and_v2")
    def _():
        check(keys_of(v.list_objects(Bucket=name)) == ["dir/obj.txt"], "list_objects")
        answer = v.list_objects_v2(Bucket=name, Delimiter="/")
        check_virtual(v, "list_objects_v2")
        check(prefixes_of(answer) == ["dir/"], f"CommonPrefixes {prefixes_of(answer)}")

    @g.check("boto3_copy_object_and_delete_objects")
    def _():
        v.copy_object(Bucket=name, Key="copy.txt",
                      CopySource={"Bucket": name, "Key": "dir/obj.txt"})
        check(body_of(v, name, "copy.txt") == b"virtual bytes", "the copy's bytes differ")
        answer = v.delete_objects(Bucket=name, Delete={"Objects": [{"Key": "copy.txt"}]})
        check([d["Key"] for d in answer.get("Deleted", [])] == ["copy.txt"], brief(answer))

    @g.check("boto3_multipart_upload")
    def _():
        upload = v.create_multipart_upload(Bucket=name, Key="mpu.bin")["UploadId"]
        etag = v.upload_part(Bucket=name, Key="mpu.bin", UploadId=upload, PartNumber=1,
                             Body=b"one part")["ETag"]
        v.complete_multipart_upload(Bucket=name, Key="mpu.bin", UploadId=upload,
                                    MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]})
        check_virtual(v, "complete_multipart_upload")
        check(body_of(v, name, "mpu.bin") == b"one part", "the completed bytes differ")

    @g.check("presigned_get_url_works_with_curl")
    def _():
        url = v.generate_presigned_url("get_object", Params={"Bucket": name, "Key": "dir/obj.txt"},
                                       ExpiresIn=300)
        check(urlsplit(url).netloc == virtual_host(name), f"presigned URL {url}")
        reply = curl(url, resolve=f"{name}.{DOMAIN}")
        check(reply.status == 200 and reply.body == b"virtual bytes",
              f"HTTP {reply.status}: {reply.body[:200]!r}")

    @g.check("anonymous_curl_of_a_public_read_object")
    def _():
        v.put_object(Bucket=name, Key="public.txt", Body=b"public", ACL="public-read")
        url = f"https://{virtual_host(name)}/public.txt"
        reply = curl(url, resolve=f"{name}.{DOMAIN}")
        check(reply.status == 200 and reply.body == b"public",
              f"HTTP {reply.status}: {reply.body[:200]!r}")
        curl_refused(curl(f"https://{virtual_host(name)}/dir/obj.txt", resolve=f"{name}.{DOMAIN}"),
                     "AccessDenied", 403, "anonymous curl of a private object")

    @g.check("a_host_header_under_localhost_names_the_bucket_too")
    def _():
        # `<bucket>.localhost` cannot be verified by OpenSSL clients (see KARRI_S3_DOMAIN), so
        # TLS goes to 127.0.0.1 and only the Host header names the bucket.
        reply = curl(f"https://127.0.0.1:{PORT}/public.txt", "-H",
                     f"Host: {name}.localhost:{PORT}")
        check(reply.status == 200 and reply.body == b"public",
              f"HTTP {reply.status}: {reply.body[:200]!r}")

    @g.check("awscli_s3api_put_get_and_list_by_host_name")
    def _():
        path = write_file(os.path.join(TMP, "virtual", "cli.txt"), b"from the awscli\n")
        aws("s3api", "put-object", "--bucket", name, "--key", "cli.txt", "--body", path,
            virtual=True)
        out = os.path.join(TMP, "virtual", "cli-down.txt")
        aws("s3api", "get-object", "--bucket", name, "--key", "cli.txt", out, virtual=True)
        check(read_file(out) == b"from the awscli\n", "downloaded bytes differ")
        done = aws("s3api", "list-objects-v2", "--bucket", name, "--output", "json", "--debug",
                   virtual=True)
        check(f"url=https://{virtual_host(name)}/" in done.stderr,
              f"the awscli did not send list-objects-v2 to https://{virtual_host(name)}/")
        check('"cli.txt"' in done.stdout, f"list-objects-v2 printed {tail(done.stdout)}")

    config = None

    @g.check("s3cmd_config_for_virtual_hosts")
    def _():
        nonlocal config
        config = s3cmd_config("virtual", virtual=True)

    s3cmd_round_trip(g, lambda: config, bucket("s3cmd-virtual"), virtual=True)

    @g.check("boto3_delete_objects_and_bucket")
    def _():
        for key in keys_of(v.list_objects_v2(Bucket=name)):
            v.delete_object(Bucket=name, Key=key)
        v.delete_bucket(Bucket=name)
        check_virtual(v, "delete_bucket")
        expect_error("404", 404, s3(A).head_bucket, Bucket=name)


def s3cmd_round_trip(g, config, name, virtual):
    """s3cmd mb, put (one part and multipart), ls, get, del, rb of bucket `name`."""
    small = os.urandom(100 * KIB)
    big = os.urandom(12 * MIB)
    here = os.path.join(TMP, "s3cmd-" + ("virtual" if virtual else "path"))

    @g.check("s3cmd_mb")
    def _():
        out = s3cmd(config(), "mb", f"s3://{name}", virtual=virtual)
        check(f"s3://{name}/" in out, f"s3cmd mb printed {out!r}")
        check(s3(A).get_bucket_location(Bucket=name).get("LocationConstraint") == REGION,
              "the bucket is not in the region")

    @g.check("s3cmd_put")
    def _():
        s3cmd(config(), "put", write_file(os.path.join(here, "small.bin"), small),
              f"s3://{name}/small.bin", virtual=virtual)
        check(body_of(s3(A), name, "small.bin") == small, "stored bytes differ")

    @g.check("s3cmd_put_multipart")
    def _():
        s3cmd(config(), "put", "--multipart-chunk-size-mb=5",
              write_file(os.path.join(here, "big.bin"), big), f"s3://{name}/big.bin",
              virtual=virtual)
        head = s3(A).head_object(Bucket=name, Key="big.bin")
        expected = multipart_etag([big[:5 * MIB], big[5 * MIB:10 * MIB], big[10 * MIB:]])
        check(head["ETag"] == expected, f"ETag {head['ETag']}, expected {expected}")

    @g.check("s3cmd_ls")
    def _():
        out = s3cmd(config(), "ls", virtual=virtual)
        check(f"s3://{name}" in out, f"s3cmd ls does not list the bucket: {out!r}")
        out = s3cmd(config(), "ls", f"s3://{name}", virtual=virtual)
        for key, data in (("small.bin", small), ("big.bin", big)):
            line = [x for x in out.splitlines() if x.endswith(f"s3://{name}/{key}")]
            check(line and str(len(data)) in line[0].split(), f"s3cmd ls shows {out!r}")

    @g.check("s3cmd_get")
    def _():
        for key, data in (("small.bin", small), ("big.bin", big)):
            path = os.path.join(here, f"down-{key}")
            s3cmd(config(), "get", "--force", f"s3://{name}/{key}", path, virtual=virtual)
            check(read_file(path) == data, f"s3cmd get {key}: bytes differ")

    @g.check("s3cmd_del")
    def _():
        s3cmd(config(), "del", f"s3://{name}/small.bin", f"s3://{name}/big.bin",
              virtual=virtual)
        check(keys_of(s3(A).list_objects_v2(Bucket=name)) == [], "objects left")

    @g.check("s3cmd_rb")
    def _():
        s3cmd(config(), "rb", f"s3://{name}", virtual=virtual)
        expect_error("404", 404, s3(A).head_bucket, Bucket=name)


def group_objectstorage(suite):
    g = suite.group("objectstorage")
    e = s3(A, endpoint=EUCA_ENDPOINT)
    name = bucket("eucalyptus")

    @g.setup("boto3_create_bucket_under_the_services_objectstorage_prefix")
    def _():
        make_bucket(e, name)
        method, url, _ = last_sent(e)
        check(url.startswith(f"{EUCA_ENDPOINT}/{name}"), f"create_bucket sent {method} {url}")

    @g.check("boto3_put_get_head_and_list")
    def _():
        e.put_object(Bucket=name, Key="euca/obj.txt", Body=b"eucalyptus bytes")
        check(last_sent(e)[1].startswith(f"{EUCA_ENDPOINT}/{name}/euca/obj.txt"),
              f"put_object sent to {last_sent(e)[1]}")
        check(body_of(e, name, "euca/obj.txt") == b"eucalyptus bytes", "get bytes differ")
        check(e.head_object(Bucket=name, Key="euca/obj.txt")["ETag"]
              == etag_of(b"eucalyptus bytes"), "head ETag differs")
        check(keys_of(e.list_objects_v2(Bucket=name)) == ["euca/obj.txt"], "list differs")
        check(keys_of(e.list_objects(Bucket=name, Prefix="euca/")) == ["euca/obj.txt"],
              "list v1 differs")

    @g.check("list_buckets_under_the_prefix_shows_the_bucket")
    def _():
        check(name in [x["Name"] for x in e.list_buckets()["Buckets"]], "bucket not listed")

    @g.check("the_same_objects_are_served_at_the_root")
    def _():
        check(body_of(s3(A), name, "euca/obj.txt") == b"eucalyptus bytes", "root get differs")
        s3(A).put_object(Bucket=name, Key="root.txt", Body=b"from the root")
        check(body_of(e, name, "root.txt") == b"from the root", "prefixed get differs")

    @g.check("presigned_get_url_works_with_curl")
    def _():
        url = e.generate_presigned_url("get_object", Params={"Bucket": name,
                                                             "Key": "euca/obj.txt"})
        check(url.startswith(f"{EUCA_ENDPOINT}/{name}/"), f"presigned URL {url}")
        reply = curl(url)
        check(reply.status == 200 and reply.body == b"eucalyptus bytes",
              f"HTTP {reply.status}: {reply.body[:200]!r}")

    @g.check("awscli_s3_cp_and_ls")
    def _():
        path = write_file(os.path.join(TMP, "euca", "up.txt"), b"awscli under the prefix\n")
        aws("s3", "cp", "--no-progress", path, f"s3://{name}/cli/up.txt",
            endpoint=EUCA_ENDPOINT)
        down = os.path.join(TMP, "euca", "down.txt")
        aws("s3", "cp", "--no-progress", f"s3://{name}/cli/up.txt", down, endpoint=EUCA_ENDPOINT)
        check(read_file(down) == b"awscli under the prefix\n", "downloaded bytes differ")
        done = aws("s3", "ls", f"s3://{name}/cli/", endpoint=EUCA_ENDPOINT)
        check("up.txt" in done.stdout, f"aws s3 ls printed {done.stdout!r}")

    @g.check("anonymous_aws_chunked_put_under_the_prefix_stores_the_bytes_not_the_framing")
    def _():
        open_bucket = bucket("euca-open")
        make_bucket(s3(A), open_bucket, acl="public-read-write")
        anonymous = s3(anonymous=True, endpoint=EUCA_ENDPOINT)
        data = os.urandom(70 * KIB)
        anonymous.put_object(Bucket=open_bucket, Key="nobody.bin", Body=data, ACL="public-read")
        sent = last_sent(anonymous)[2]
        check("aws-chunked" in sent.get("content-encoding", ""),
              f"botocore sent Content-Encoding {sent.get('content-encoding')!r}")
        got = body_of(s3(A), open_bucket, "nobody.bin")
        check(got == data, f"read back {len(got)} bytes (md5 {md5hex(got)}), expected "
              f"{len(data)} ({md5hex(data)})")
        s3(A).delete_object(Bucket=open_bucket, Key="nobody.bin")
        s3(A).delete_bucket(Bucket=open_bucket)

    @g.check("boto3_delete_object_and_bucket")
    def _():
        for key in keys_of(e.list_objects_v2(Bucket=name)):
            e.delete_object(Bucket=name, Key=key)
        e.delete_bucket(Bucket=name)
        expect_error("404", 404, e.head_bucket, Bucket=name)


def group_awscli(suite):
    g = suite.group("awscli")
    name = bucket("awscli")
    here = os.path.join(TMP, "awscli")
    small = b"small file for the awscli\n" * 10
    big = os.urandom(20 * MIB)
    tree = {"a.txt": b"a\n", "sub/b.txt": b"bb\n", "sub/deeper/c.txt": b"ccc\n"}

    def sync_dir(which):
        return os.path.join(here, which)

    def remote_keys(prefix=""):
        keys = []
        for page in s3(A).get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix):
            keys += keys_of(page)
        return keys

    @g.setup("aws_s3_mb_makes_a_bucket_in_the_region")
    def _():
        done = aws("s3", "mb", f"s3://{name}")
        check(f"make_bucket: {name}" in done.stdout, f"aws s3 mb printed {done.stdout!r}")
        check(s3(A).get_bucket_location(Bucket=name).get("LocationConstraint") == REGION,
              "the bucket is not in the region")

    @g.check("aws_s3_ls_lists_the_bucket")
    def _():
        done = aws("s3", "ls")
        check(name in done.stdout.split(), f"aws s3 ls printed {done.stdout!r}")

    @g.check("aws_s3_cp_uploads_a_small_file")
    def _():
        path = write_file(os.path.join(here, "small.txt"), small)
        aws("s3", "cp", "--no-progress", path, f"s3://{name}/small.txt")
        got = s3(A).get_object(Bucket=name, Key="small.txt")
        check(got["Body"].read() == small and got["ETag"] == etag_of(small), "stored differs")

    @g.check("aws_s3_cp_uploads_20_mib_in_multipart")
    def _():
        path = write_file(os.path.join(here, "big.bin"), big)
        aws("s3", "cp", "--no-progress", path, f"s3://{name}/big.bin")
        head = s3(A).head_object(Bucket=name, Key="big.bin")
        # The awscli's default multipart_chunksize is 8 MiB: 8 + 8 + 4.
        expected = multipart_etag([big[:8 * MIB], big[8 * MIB:16 * MIB], big[16 * MIB:]])
        check(head["ETag"] == expected, f"ETag {head['ETag']}, expected {expected}")
        check(head["ContentLength"] == len(big), f"length {head['ContentLength']}")

    @g.check("aws_s3_cp_downloads_the_20_mib_object")
    def _():
        path = os.path.join(here, "big-down.bin")
        aws("s3", "cp", "--no-progress", f"s3://{name}/big.bin", path)
        got = read_file(path)
        check(got == big, f"downloaded {len(got)} bytes (md5 {md5hex(got)}), expected "
              f"{len(big)} ({md5hex(big)})")

    @g.check("aws_s3_ls_lists_objects_with_sizes")
    def _():
        done = aws("s3", "ls", f"s3://{name}/")
        lines = {line.split()[-1]: line.split() for line in done.stdout.splitlines() if line}
        check(str(len(small)) in lines.get("small.txt", []) and
              str(len(big)) in lines.get("big.bin", []), f"aws s3 ls printed {done.stdout!r}")

    @g.check("aws_s3_rb_of_a_non_empty_bucket_fails")
    def _():
        done = aws("s3", "rb", f"s3://{name}", must_succeed=False)
        check(done.returncode != 0 and "BucketNotEmpty" in done.stderr,
              f"aws s3 rb exited {done.returncode}: {tail(done.stderr)}")

    @g.check("aws_s3_sync_uploads_a_tree")
    def _():
        # sync uploads a file modified after its object: date the files a minute back, so
        # that the objects (Last-Modified in whole seconds) are newer whatever the timing.
        then = time.time() - 60
        for rel, data in tree.items():
            os.utime(write_file(os.path.join(sync_dir("up"), rel), data), (then, then))
        aws("s3", "sync", "--no-progress", sync_dir("up"), f"s3://{name}/tree/")
        expected = sorted(f"tree/{k}" for k in tree)
        check(sorted(remote_keys("tree/")) == expected, f"remote {remote_keys('tree/')}")
        for rel, data in tree.items():
            check(body_of(s3(A), name, f"tree/{rel}") == data, f"tree/{rel} differs")

    @g.check("aws_s3_sync_again_uploads_nothing")
    def _():
        done = aws("s3", "sync", "--no-progress", sync_dir("up"), f"s3://{name}/tree/")
        check(done.stdout.strip() == "", f"the second sync printed {done.stdout!r}")

    @g.check("aws_s3_sync_uploads_only_a_changed_file")
    def _():
        write_file(os.path.join(sync_dir("up"), "sub/b.txt"), b"changed and longer\n")
        done = aws("s3", "sync", "--no-progress", sync_dir("up"), f"s3://{name}/tree/")
        lines = [x for x in done.stdout.splitlines() if x.strip()]
        check(len(lines) == 1 and lines[0].startswith("upload:") and "sub/b.txt" in lines[0],
              f"the sync printed {done.stdout!r}")
        check(body_of(s3(A), name, "tree/sub/b.txt") == b"changed and longer\n", "not changed")

    @g.check("aws_s3_sync_downloads_the_tree")
    def _():
        aws("s3", "sync", "--no-progress", f"s3://{name}/tree/", sync_dir("down"))
        for rel in tree:
            check(read_file(os.path.join(sync_dir("down"), rel))
                  == read_file(os.path.join(sync_dir("up"), rel)), f"{rel} differs")

    @g.check("aws_s3_sync_delete_removes_what_is_gone_locally")
    def _():
        os.remove(os.path.join(sync_dir("up"), "a.txt"))
        aws("s3", "sync", "--no-progress", "--delete", sync_dir("up"), f"s3://{name}/tree/")
        check(sorted(remote_keys("tree/")) == ["tree/sub/b.txt", "tree/sub/deeper/c.txt"],
              f"remote {remote_keys('tree/')}")

    @g.check("aws_s3api_get_bucket_location_and_head_object")
    def _():
        done = aws("s3api", "get-bucket-location", "--bucket", name, "--output", "json")
        check(json.loads(done.stdout).get("LocationConstraint") == REGION, done.stdout)
        done = aws("s3api", "head-object", "--bucket", name, "--key", "small.txt",
                   "--output", "json")
        check(json.loads(done.stdout).get("ETag") == etag_of(small), done.stdout)

    @g.check("aws_s3api_head_bucket_of_a_missing_bucket_fails_with_404")
    def _():
        done = aws("s3api", "head-bucket", "--bucket", bucket("missing"), must_succeed=False)
        check(done.returncode != 0 and "404" in done.stderr,
              f"exit {done.returncode}: {tail(done.stderr)}")

    @g.check("aws_s3_rm_recursive_empties_the_bucket")
    def _():
        aws("s3", "rm", "--recursive", "--only-show-errors", f"s3://{name}")
        check(remote_keys() == [], f"left: {remote_keys()}")

    @g.check("aws_s3_rb_removes_the_bucket")
    def _():
        done = aws("s3", "rb", f"s3://{name}")
        check(f"remove_bucket: {name}" in done.stdout, f"aws s3 rb printed {done.stdout!r}")
        expect_error("404", 404, s3(A).head_bucket, Bucket=name)


def group_s3cmd(suite):
    g = suite.group("s3cmd")
    config = None

    @g.setup("s3cmd_config_for_path_style")
    def _():
        nonlocal config
        config = s3cmd_config("path", virtual=False)

    s3cmd_round_trip(g, lambda: config, bucket("s3cmd"), virtual=False)

    @g.check("s3cmd_put_acl_public_is_anonymously_readable")
    def _():
        name = bucket("s3cmd-public")
        s3cmd(config, "mb", f"s3://{name}")
        path = write_file(os.path.join(TMP, "s3cmd-public", "p.txt"), b"public via s3cmd\n")
        s3cmd(config, "put", "--acl-public", path, f"s3://{name}/p.txt")
        reply = curl(f"{ENDPOINT}/{name}/p.txt")
        check(reply.status == 200 and reply.body == b"public via s3cmd\n",
              f"HTTP {reply.status}: {reply.body[:200]!r}")
        s3cmd(config, "del", f"s3://{name}/p.txt")
        s3cmd(config, "rb", f"s3://{name}")


def empty_and_delete(name, owner, other):
    """Deletes bucket `name` of `owner` with everything in it (objects `other` wrote that the
    owner may not delete are deleted as `other`)."""
    for page in owner.get_paginator("list_multipart_uploads").paginate(Bucket=name):
        for u in page.get("Uploads", []):
            owner.abort_multipart_upload(Bucket=name, Key=u["Key"], UploadId=u["UploadId"])
    for page in owner.get_paginator("list_objects_v2").paginate(Bucket=name):
        for key in keys_of(page):
            try:
                owner.delete_object(Bucket=name, Key=key)
            except ClientError:
                other.delete_object(Bucket=name, Key=key)
    owner.delete_bucket(Bucket=name)


def group_cleanup(suite):
    g = suite.group("cleanup")

    @g.check("every_bucket_of_the_run_is_deleted")
    def _():
        left = []
        for owner, other in ((s3(A), s3(B)), (s3(B), s3(A))):
            for found in owner.list_buckets().get("Buckets", []):
                if not found["Name"].startswith(PREFIX + "-"):
                    continue
                try:
                    empty_and_delete(found["Name"], owner, other)
                except (ClientError, BotoCoreError) as e:
                    left.append(f"{found['Name']}: {describe(e)}")
        check(not left, "buckets left: " + "; ".join(left))


GROUPS = {
    "preflight": group_preflight,
    "owners": group_owners,
    "buckets": group_buckets,
    "objects": group_objects,
    "listing": group_listing,
    "multipart": group_multipart,
    "presign": group_presign,
    "acl": group_acl,
    "isolation": group_isolation,
    "tagging": group_tagging,
    "errors": group_errors,
    "virtual": group_virtual,
    "objectstorage": group_objectstorage,
    "awscli": group_awscli,
    "s3cmd": group_s3cmd,
    "cleanup": group_cleanup,
}
# Run whatever else was asked: they need the owners' IDs and leave nothing behind.
ALWAYS = ("preflight", "owners", "cleanup")


def configure():
    global ENDPOINT, CA, REGION, DOMAIN, HOST, PORT, A, B, PREFIX, VHOST_ENDPOINT, EUCA_ENDPOINT
    global AWS_CONFIG_PATH, AWS_CONFIG_VIRTUAL
    needed = ["AWS_ENDPOINT_URL", "AWS_CA_BUNDLE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "KARRI_S3_B_ACCESS_KEY_ID", "KARRI_S3_B_SECRET_ACCESS_KEY"]
    missing = [n for n in needed if not os.environ.get(n)]
    if missing:
        print(f"{sys.argv[0]}: set {', '.join(missing)} (see the top of this file)",
              file=sys.stderr)
        sys.exit(2)
    ENDPOINT = os.environ["AWS_ENDPOINT_URL"].rstrip("/")
    url = urlsplit(ENDPOINT)
    HOST, PORT = url.hostname, url.port or 443
    CA = os.environ["AWS_CA_BUNDLE"]
    REGION = os.environ.get("AWS_DEFAULT_REGION") or "karri-1"
    DOMAIN = os.environ.get("KARRI_S3_DOMAIN") or "s3.localhost"
    A = Keys(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
    B = Keys(os.environ["KARRI_S3_B_ACCESS_KEY_ID"], os.environ["KARRI_S3_B_SECRET_ACCESS_KEY"])
    PREFIX = "kc" + secrets.token_hex(4)
    VHOST_ENDPOINT = f"https://{DOMAIN}:{PORT}"
    EUCA_ENDPOINT = f"{ENDPOINT}/services/objectstorage"
    AWS_CONFIG_PATH = os.path.join(TMP, "aws-config-path")
    AWS_CONFIG_VIRTUAL = os.path.join(TMP, "aws-config-virtual")
    for path, style in ((AWS_CONFIG_PATH, "path"), (AWS_CONFIG_VIRTUAL, "virtual")):
        with open(path, "w") as f:
            f.write(f"[default]\nregion = {REGION}\ns3 =\n    addressing_style = {style}\n")


def main():
    global TMP
    if "--list" in sys.argv[1:]:
        print("\n".join(GROUPS))
        return 0
    asked = sys.argv[1:] or list(GROUPS)
    unknown = [x for x in asked if x not in GROUPS]
    if unknown:
        print(f"unknown groups {unknown}; groups: {' '.join(GROUPS)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    suite = Suite()
    with tempfile.TemporaryDirectory(prefix="s3-compat-") as tmp:
        TMP = tmp
        configure()
        print(f"S3 at {ENDPOINT} (virtual hosts *.{DOMAIN}:{PORT}), region {REGION}, "
              f"buckets {PREFIX}-*", flush=True)
        for name, run in GROUPS.items():
            if name in asked or name in ALWAYS:
                try:
                    run(suite)
                except Exception as e:  # noqa: BLE001 - a broken group must not stop cleanup
                    suite.failed += 1
                    print(f"FAIL {name}: the group broke: {describe(e)}", flush=True)
    if RESENT:
        print(f"note: boto3 sent {len(RESENT)} requests again after their kept-alive connection "
              f"closed without an answer: {', '.join(RESENT)}", flush=True)
    print(f"passed: {suite.passed}, failed: {suite.failed}, skipped: {suite.skipped} "
          f"({time.monotonic() - started:.1f} s)", flush=True)
    return 0 if suite.failed == 0 and suite.skipped == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
