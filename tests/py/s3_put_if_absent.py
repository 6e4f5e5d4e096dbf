#!/usr/bin/env python3
"""Does an S3 endpoint do put-if-absent, atomically? Prints JSON.

Usage: s3_put_if_absent.py <endpoint> <bucket> [trials]

delta-rs commits version N of a table by a PUT of `_delta_log/N.json` with `If-None-Match: *`
(object_store's `PutMode::Create`): of several writers racing for one version exactly one may
win, the others get 412 and retry on the next version. This probe checks:

- `sequential_refused`: a second conditional PUT of an existing key gets 412 and leaves the
  object unchanged;
- `double_winners`: over `trials` rounds, 8 threads PUT one fresh key at the same moment; the
  number of rounds in which more than one of them got 200 (must be 0).
- `server_errors`: 5xx answers met during the rounds.
"""

import json
import sys
import threading

import boto3
import botocore
from botocore.config import Config


def main(endpoint, bucket, trials):
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="probe",
        aws_secret_access_key="probe-secret",
        config=Config(max_pool_connections=16, retries={"max_attempts": 0}),
    )
    key = "probe/sequential.json"
    s3.put_object(Bucket=bucket, Key=key, Body=b"first", IfNoneMatch="*")
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=b"second", IfNoneMatch="*")
        refused = False
    except botocore.exceptions.ClientError as e:
        refused = e.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    refused = refused and s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"first"

    doubles = errors = 0
    for t in range(trials):
        key = f"probe/_delta_log/{t:020}.json"
        winners = []
        barrier = threading.Barrier(8)

        def put(i):
            nonlocal errors
            barrier.wait()
            try:
                s3.put_object(Bucket=bucket, Key=key, Body=str(i).encode(), IfNoneMatch="*")
                winners.append(i)
            except botocore.exceptions.ClientError as e:
                if e.response["ResponseMetadata"]["HTTPStatusCode"] >= 500:
                    errors += 1

        threads = [threading.Thread(target=put, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if len(winners) > 1:
            doubles += 1
    print(
        json.dumps(
            {"sequential_refused": refused, "trials": trials, "double_winners": doubles, "server_errors": errors}
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 100)
