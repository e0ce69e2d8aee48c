#!/usr/bin/env python3
"""The plain-S3-client reference for compare.sh's RGW runs: PUTs every file under DIR (ferry's
file:// repository of the same backup: the same objects, the same sizes) into
s3://BUCKET/PREFIX/ with boto3, THREADS requests in flight, then GETs them all back (bodies
read in full). Prints one JSON line: objects, bytes, put_s, get_s.

    s3peer.py DIR BUCKET PREFIX [THREADS]

Endpoint and credentials from AWS_ENDPOINT (or AWS_ENDPOINT_URL), AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION (the dev cluster's `scripts/ceph-dev env`).
"""

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config


def main():
    root, bucket, prefix = sys.argv[1], sys.argv[2], sys.argv[3].strip("/")
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    files = []
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            files.append((p, os.path.relpath(p, root)))
    # Bodies read before the clock starts (the client's throughput, not this disk's) when they
    # fit in 2 GiB; otherwise each is read when it is sent.
    total = sum(os.path.getsize(p) for p, _ in files)
    preload = total <= 2 << 30
    bodies = [(f"{prefix}/{rel}", open(p, "rb").read() if preload else p) for p, rel in files]
    size = {key: os.path.getsize(p) for (key, _), (p, _) in zip(bodies, files)}
    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT"),
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        config=Config(max_pool_connections=threads, retries={"max_attempts": 3}),
    )

    def put(kb):
        body = kb[1] if preload else open(kb[1], "rb").read()
        s3.put_object(Bucket=bucket, Key=kb[0], Body=body)

    def get(kb):
        body = s3.get_object(Bucket=bucket, Key=kb[0])["Body"].read()
        if len(body) != size[kb[0]]:
            raise SystemExit(f"GET {kb[0]}: {len(body)} bytes, PUT {size[kb[0]]}")

    with ThreadPoolExecutor(threads) as pool:
        t0 = time.monotonic()
        list(pool.map(put, bodies))
        t1 = time.monotonic()
        list(pool.map(get, bodies))
        t2 = time.monotonic()
    print(json.dumps({"objects": len(bodies), "bytes": total, "put_s": round(t1 - t0, 3), "get_s": round(t2 - t1, 3),
                      "threads": threads}))


if __name__ == "__main__":
    main()
