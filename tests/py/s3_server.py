#!/usr/bin/env python3
"""A local S3 server for the tests: moto's server mode on a free loopback port.

Usage: s3_server.py [--bucket NAME]... [--auth] [--read-only] [--unserialized]
                    [--ignore-if-none-match] [--switch-interval SECONDS]

Prints one JSON line once it serves: {"endpoint", "region", "access_key_id",
"secret_access_key"}, then serves until stdin closes (the test process died or dropped its
handle) or SIGTERM/SIGINT.

- `--bucket NAME` creates the bucket before the line is printed.
- `--auth` turns moto's IAM checks on: only the printed key pair is accepted (an IAM user with
  an allow-all policy); without it moto accepts any credentials.
- `--read-only` (implies `--auth`): the printed key may only read and list (s3:Get*, s3:List*).
- `--ignore-if-none-match` drops the `If-None-Match` header of every request: a store that
  does not support conditional writes, where a second put-if-absent of a key succeeds.
- Writes (PUT, POST, DELETE) are served one at a time unless `--unserialized`: moto 5.2 checks
  `If-None-Match: *` and then stores the object without a lock between the two, so two
  concurrent conditional PUTs of one key can both succeed (see tests/py/s3_put_if_absent.py).
  delta-rs commits with exactly such PUTs; S3, MinIO and R2 make them atomic. Serializing the
  writes gives moto the same guarantee, and `--unserialized` keeps moto as shipped.
- `--switch-interval` lowers the interpreter's thread switch interval, which widens moto's race
  window so that the probe shows it within a few dozen tries.
"""

import argparse
import json
import logging
import signal
import sys
import threading

import boto3
import requests
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

REGION = "us-east-1"
# What moto accepts while its IAM checks are off (and the identity that creates the user).
SETUP_KEY = ("setup", "setup-secret")


class SerializedWrites:
    """WSGI middleware: one mutating request at a time, reads stay concurrent."""

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") not in ("PUT", "POST", "DELETE"):
            return self.app(environ, start_response)
        with self.lock:
            result = self.app(environ, start_response)
            try:
                body = b"".join(result)
            finally:
                if hasattr(result, "close"):
                    result.close()
            return [body]


class IgnoreIfNoneMatch:
    """WSGI middleware: the store ignores conditional-write headers."""

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        environ.pop("HTTP_IF_NONE_MATCH", None)
        return self.app(environ, start_response)


def client(service, endpoint, key):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=key[0],
        aws_secret_access_key=key[1],
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bucket", action="append", default=[])
    ap.add_argument("--auth", action="store_true")
    ap.add_argument("--read-only", action="store_true")
    ap.add_argument("--unserialized", action="store_true")
    ap.add_argument("--ignore-if-none-match", action="store_true")
    ap.add_argument("--switch-interval", type=float)
    args = ap.parse_args()
    # One line per request would flood the test's output; errors still show.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)

    app = DomainDispatcherApplication(create_backend_app)
    if not args.unserialized:
        app = SerializedWrites(app)
    if args.ignore_if_none_match:
        app = IgnoreIfNoneMatch(app)
    args.auth = args.auth or args.read_only
    server = make_server("127.0.0.1", 0, app, threaded=True)
    endpoint = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()

    key = SETUP_KEY
    if args.auth:
        iam = client("iam", endpoint, SETUP_KEY)
        iam.create_user(UserName="possync")
        actions = ["s3:Get*", "s3:List*"] if args.read_only else "*"
        iam.put_user_policy(
            UserName="possync",
            PolicyName="all",
            PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
            ),
        )
        k = iam.create_access_key(UserName="possync")["AccessKey"]
        key = (k["AccessKeyId"], k["SecretAccessKey"])
    s3 = client("s3", endpoint, key)
    for b in args.bucket:
        s3.create_bucket(Bucket=b)
    if args.auth:
        # From now on every request is checked against IAM.
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()

    print(
        json.dumps(
            {"endpoint": endpoint, "region": REGION, "access_key_id": key[0], "secret_access_key": key[1]}
        ),
        flush=True,
    )

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def stdin_closed():
        sys.stdin.read()
        stop.set()

    threading.Thread(target=stdin_closed, daemon=True).start()
    stop.wait()
    server.shutdown()


if __name__ == "__main__":
    main()
