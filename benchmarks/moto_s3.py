"""A real S3 endpoint for benchmarks: moto's server on 127.0.0.1 in this process, reached by raylm (and the
trainer processes it starts) through the standard AWS environment, as any S3 would be."""

from __future__ import annotations

import logging
import os


def start_moto(bucket: str):
    """Start the server, point the AWS environment at it and create `bucket`; returns the server (`.stop()`)."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
    return server
