"""A JSON-lines driver of boto3 and botocore for Karri's EC2 end-to-end tests.

The Rust tests (`e2e/tests/ec2_*.rs`) start it with `<workspace>/.venv/bin/python -u` and the
environment of `Gateway::aws_env(&creds)` (endpoint, keys, region `karri-1`, the gateway's CA),
write one JSON request per line on its standard input and read one JSON answer per line on its
standard output. It stops at the end of its input.

Requests:

``{"op": "call", "method": "describe_instances", "params": {...}}``
    One call of boto3's EC2 client. Answers ``{"ok": true, "status": 200, "result": {...}}``
    (the parsed response without ``ResponseMetadata``; timestamps as ISO strings) or
    ``{"ok": false, "status": 400, "code": "InvalidInstanceID.NotFound", "message": "..."}``
    for an AWS error. A failure that is not an AWS error answer (boto3 refusing the parameters,
    a broken connection ...) gives ``"ok": false`` with ``"code": null`` and the exception in
    ``"message"``.

``{"op": "call", "service": "s3", "method": "put_object", "params": {...}}``
    The same with boto3's S3 client (path-style addressing, same endpoint and keys): to
    upload the objects images are registered from.

``{"op": "concurrent", "method": "run_instances", "params": {...}, "calls": 50,
   "warm_up": "describe_regions"}``
    The same call ``calls`` times at once: a ``ThreadPoolExecutor`` of that many threads sharing
    one client (boto3 clients are thread-safe) whose connection pool holds them all, released
    together by a barrier. With ``warm_up``, each thread first makes that call (no parameters)
    and waits for the others, so every connection is open before the calls leave. Answers
    ``{"answers": [answer, ...]}``, each shaped like ``call``'s plus ``"started"`` and
    ``"finished"`` (``time.monotonic()`` around the call), which show how far the calls overlapped.

``{"op": "sign", "method": "POST", "url": "...", "body": "Action=...", "skew_seconds": 0,
   "access_key": null, "secret_key": null, "session_token": null}``
    Signs a raw request with botocore's ``SigV4Auth`` (service ``ec2``) for the caller to send:
    answers ``{"headers": {...}}``. The keys default to the environment's (a ``session_token``
    is signed as ``X-Amz-Security-Token``, as temporary credentials are); ``skew_seconds``
    moves the signing time (negative: in the past) by patching the clock botocore's signer
    reads, so no test ever waits for time to pass.

``{"op": "presign", "url": "...", "query": "Action=...", "expires": 60, "skew_seconds": 0}``
    A presigned GET URL from botocore's ``SigV4QueryAuth`` signed at now + ``skew_seconds``:
    answers ``{"url": "..."}``.

``{"op": "generate_presigned_url", "method": "describe_instances", "params": {}, "expires": 60,
   "http_method": "GET"}``
    boto3's own ``generate_presigned_url``: answers ``{"url": "..."}``. Without ``http_method``
    the URL is signed for POST (EC2's query protocol posts), so it must be sent as a POST.
"""

import concurrent.futures
import datetime
import json
import os
import sys
import threading
import time
import traceback
from unittest import mock

import boto3
import botocore.auth
import botocore.awsrequest
import botocore.config
import botocore.credentials
import botocore.exceptions

SERVICE = "ec2"
FORM = "application/x-www-form-urlencoded; charset=utf-8"


def _jsonable(value):
    """boto3's parsed responses hold datetimes and bytes: make them JSON."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if k != "ResponseMetadata"}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _client(pool=10, service=SERVICE):
    config = botocore.config.Config(
        retries={"max_attempts": 1, "mode": "standard"},
        max_pool_connections=pool,
        connect_timeout=10,
        read_timeout=60,
        s3={"addressing_style": "path"},
    )
    return boto3.session.Session().client(service, config=config)


def _call(client, method, params):
    try:
        response = getattr(client, method)(**params)
    except botocore.exceptions.ClientError as e:
        error = e.response.get("Error", {})
        return {
            "ok": False,
            "status": e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
            "code": error.get("Code"),
            "message": error.get("Message", ""),
        }
    except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
        return {"ok": False, "status": None, "code": None, "message": f"{type(e).__name__}: {e}"}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return {"ok": True, "status": status, "result": _jsonable(response)}


def _concurrent(method, params, calls, warm_up=None):
    client = _client(pool=calls)
    barrier = threading.Barrier(calls)

    def one(_):
        if warm_up:
            # Open every thread's connection first, all at once, so that the calls below
            # leave together rather than one TLS handshake after another.
            barrier.wait(timeout=60)
            _call(client, warm_up, {})
        barrier.wait(timeout=60)
        started = time.monotonic()
        answer = _call(client, method, params)
        answer.update(started=started, finished=time.monotonic())
        return answer

    with concurrent.futures.ThreadPoolExecutor(max_workers=calls) as pool:
        return list(pool.map(one, range(calls)))


def _clock(skew_seconds):
    """A patch of the clock botocore's signers read, `skew_seconds` away from now."""
    moved = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) + datetime.timedelta(
        seconds=skew_seconds
    )
    return mock.patch.object(botocore.auth, "get_current_datetime", lambda *a, **k: moved)


def _credentials(req):
    return botocore.credentials.Credentials(
        req.get("access_key") or os.environ["AWS_ACCESS_KEY_ID"],
        req.get("secret_key") or os.environ["AWS_SECRET_ACCESS_KEY"],
        req.get("session_token"),
    )


def _region():
    return os.environ.get("AWS_DEFAULT_REGION", "karri-1")


def _sign(req):
    headers = {"Content-Type": FORM}
    headers.update(req.get("headers") or {})
    request = botocore.awsrequest.AWSRequest(
        method=req.get("method", "POST"),
        url=req["url"],
        data=req.get("body", "").encode("utf-8"),
        headers=headers,
    )
    with _clock(req.get("skew_seconds", 0)):
        botocore.auth.SigV4Auth(_credentials(req), SERVICE, _region()).add_auth(request)
    return {"headers": dict(request.headers.items())}


def _presign(req):
    url = req["url"]
    if req.get("query"):
        url = f"{url}?{req['query']}"
    request = botocore.awsrequest.AWSRequest(method="GET", url=url)
    signer = botocore.auth.SigV4QueryAuth(
        _credentials(req), SERVICE, _region(), expires=int(req.get("expires", 60))
    )
    with _clock(req.get("skew_seconds", 0)):
        signer.add_auth(request)
    return {"url": request.prepare().url}


def _generate_presigned_url(client, req):
    url = client.generate_presigned_url(
        req["method"],
        Params=req.get("params") or {},
        ExpiresIn=int(req.get("expires", 60)),
        HttpMethod=req.get("http_method"),
    )
    return {"url": url}


def main():
    client = _client()
    s3 = None
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "call" and req.get("service") == "s3":
                s3 = s3 or _client(service="s3")
                answer = _call(s3, req["method"], req.get("params") or {})
            elif op == "call":
                answer = _call(client, req["method"], req.get("params") or {})
            elif op == "concurrent":
                answers = _concurrent(
                    req["method"], req.get("params") or {}, int(req["calls"]), req.get("warm_up")
                )
                answer = {"answers": answers}
            elif op == "sign":
                answer = _sign(req)
            elif op == "presign":
                answer = _presign(req)
            elif op == "generate_presigned_url":
                answer = _generate_presigned_url(client, req)
            else:
                answer = {"driver_error": f"unknown op {op!r}"}
        except Exception:  # noqa: BLE001 - the test reports it
            answer = {"driver_error": traceback.format_exc()}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
