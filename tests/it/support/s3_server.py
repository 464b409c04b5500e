"""An S3-compatible server for the shared-tier tests (tests/it/shared_tier.rs).

moto's server (PyPI `moto[server]`, installed by .ci/run) on 127.0.0.1, on a port the kernel
picks. Creates the bucket named by the first argument, prints the port on one line, and serves
until its standard input closes (the test that started it ends, or kills it).
"""

import sys

try:
    import boto3
    from moto.server import ThreadedMotoServer
except ImportError as e:
    print(f"s3_server.py: {e}: install it with `python3 -m pip install 'moto[server]'`", file=sys.stderr)
    sys.exit(3)

server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
boto3.client(
    "s3",
    endpoint_url=f"http://{host}:{port}",
    region_name="us-east-1",
    aws_access_key_id="test",
    aws_secret_access_key="test",
).create_bucket(Bucket=sys.argv[1])
print(port, flush=True)
sys.stdin.read()
server.stop()
