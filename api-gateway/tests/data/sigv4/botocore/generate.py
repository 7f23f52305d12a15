"""Regenerate the botocore SigV4 cross-check vectors in this directory.

Run once, offline, with the project's venv:

    .venv/bin/python api-gateway/tests/data/sigv4/botocore/generate.py

A real boto3 client (EC2 and S3) signs requests against http://127.0.0.1:8773
with a fixed clock (2024-05-01T12:00:00Z) and fixed credentials; a
`before-send` hook captures each signed request and short-circuits the network.
Each request is written as HTTP/1.1 text: request line, headers, blank line,
body. botocore does not put `Host` in its headers (urllib3 adds it on the
wire); it signs the URL's netloc, so `Host:` is written from the URL, with the
port as urllib3 sends it. Presigned URLs come from `generate_presigned_url`.

Secret access key of the vectors: KarriTestSecretKey/0123456789abcdefghijKLMN
"""

import datetime
import os
import sys
from urllib.parse import urlsplit

import boto3
import botocore.auth
from botocore.awsrequest import AWSResponse

FIXED = datetime.datetime(2024, 5, 1, 12, 0, 0)
botocore.auth.get_current_datetime = lambda *a, **k: FIXED

AKID = "AKIAKARRITESTKEY0001"
SECRET = "KarriTestSecretKey/0123456789abcdefghijKLMN"
ENDPOINT = "http://127.0.0.1:8773"
OUT = os.path.dirname(os.path.abspath(__file__))

captured = []


class _Raw:
    def stream(self, **_kw):
        return iter([b""])


def capture(request, **_kw):
    captured.append(request)
    return AWSResponse(request.url, 200, {}, _Raw())


def client(service):
    c = boto3.session.Session().client(
        service,
        endpoint_url=ENDPOINT,
        region_name="karri-1",
        aws_access_key_id=AKID,
        aws_secret_access_key=SECRET,
        config=botocore.config.Config(
            s3={"addressing_style": "path"}, retries={"max_attempts": 1}
        ),
    )
    c.meta.events.register("before-send", capture)
    return c


def write(name, method, url, headers, body=b""):
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    lines = [f"{method} {target} HTTP/1.1", f"Host:{parts.netloc}"]
    for k, v in headers.items():
        if isinstance(v, bytes):
            v = v.decode()
        lines.append(f"{k}:{v}")
    data = ("\n".join(lines) + "\n\n").encode() + (body or b"")
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)


import botocore.config  # noqa: E402

ec2 = client("ec2")
try:
    ec2.describe_instances()
except Exception:
    pass
req = captured[-1]
body = req.body if isinstance(req.body, bytes) else (req.body or "").encode()
write("ec2-post-header.req", req.method, req.url, dict(req.headers), body)

url = ec2.generate_presigned_url(
    "describe_instances", Params={}, ExpiresIn=900, HttpMethod="GET"
)
write("ec2-presigned-get.req", "GET", url, {})

s3 = client("s3")
url = s3.generate_presigned_url(
    "get_object",
    Params={"Bucket": "photos", "Key": "2024/my cat+dog (1).jpg"},
    ExpiresIn=3600,
)
write("s3-presigned-get.req", "GET", url, {})

try:
    s3.put_object(Bucket="photos", Key="2024/notes ~v1.txt", Body=b"hello, karri\n")
except Exception:
    pass
req = captured[-1]
body = req.body if isinstance(req.body, bytes) else req.body.read()
write("s3-put-header.req", req.method, req.url, dict(req.headers), body)

# A request dated by the `Date` header (botocore keeps `Date` when the request
# has one) and carrying a session token, signed by SigV4Auth directly, at the
# Eucalyptus-style path.
from botocore.auth import SigV4Auth  # noqa: E402
from botocore.awsrequest import AWSRequest  # noqa: E402
from botocore.credentials import Credentials  # noqa: E402

req = AWSRequest(
    method="POST",
    url=ENDPOINT + "/services/compute",
    data=b"Action=DescribeRegions&Version=2016-11-15",
    headers={
        "Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
        "Date": "to be replaced by the signer",
    },
)
SigV4Auth(Credentials(AKID, SECRET, "karri-session-token/1+2=="), "ec2", "karri-1").add_auth(req)
write("ec2-post-date-header-token.req", req.method, req.url, dict(req.headers), req.body)

print("wrote vectors to", OUT, file=sys.stderr)
