"""Reading and writing bytes at a local path or an ``s3://bucket/key`` URI (boto3).

boto3 takes its credentials and endpoint from the usual places (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL`` for an S3-compatible server, profiles), so nothing here handles secrets.
URIs never carry them: an ``s3://`` URI with ``user:password@`` or a query string, or a URI
of any other scheme (``http://``, ``gs://``, ...), is refused with a message that shows the URI
with its credentials masked.

The S3 client is bounded: connecting gives up after ``DISTILLERY_S3_CONNECT_TIMEOUT`` seconds
(default 10), a silent server after ``DISTILLERY_S3_READ_TIMEOUT`` seconds (default 60), and a
request is tried 3 times in all (botocore's ``standard`` retry mode; ``AWS_MAX_ATTEMPTS`` and
``AWS_RETRY_MODE`` override it), so an unreachable endpoint is an error within seconds to a
few minutes, never an endless hang.
"""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path
from urllib.parse import urlparse


class StorageError(OSError):
    """An object could not be read or written; the message names the URI and the cause."""


_USERINFO = re.compile(r"(?<=://)[^/\s@]+@")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def redact_uri(text: str) -> str:
    """Mask ``user:password@`` (or a bare ``token@``) after ``scheme://`` wherever it occurs in ``text``."""
    return _USERINFO.sub("***@", text)


def credentials_in_uri(value: str) -> str | None:
    """Why ``value`` (a URI) may carry a secret, or None: ``user:password@`` after any scheme, or a
    query string on an ``s3://`` URI (e.g. a presigned URL's signature)."""
    if _USERINFO.search(value):
        return "it has credentials (user:password@)"
    if value.strip().startswith("s3://") and "?" in value:
        return "an s3:// URI cannot have a query string (?...)"
    return None


def _shown(uri: str) -> str:
    """A URI safe to print: credentials masked, an s3:// query string dropped."""
    uri = redact_uri(uri)
    return uri.split("?", 1)[0] + "?***" if uri.startswith("s3://") and "?" in uri else uri


def check_uri(uri: str) -> str:
    """``uri`` if it is a local path or a plain ``s3://bucket/key``; else :class:`StorageError`."""
    why = credentials_in_uri(uri)
    if why:
        msg = f"{_shown(uri)}: {why}; give credentials through the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile), never in a URI"
        raise StorageError(msg)
    if _SCHEME.match(uri) and not is_s3(uri):
        msg = f"{_shown(uri)}: unsupported URI scheme {uri.split('://', 1)[0]!r}; use a local path or s3://bucket/key"
        raise StorageError(msg)
    return uri


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    check_uri(uri)
    parsed = urlparse(uri)
    if not parsed.netloc:
        msg = f"{uri}: an S3 URI needs a bucket, as in s3://bucket/key"
        raise StorageError(msg)
    return parsed.netloc, parsed.path.lstrip("/")


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1
    if value <= 0:
        msg = f"{name}={raw!r}: expected a number of seconds above 0"
        raise StorageError(msg)
    return value


@cache
def s3_client():
    import boto3
    from botocore.config import Config

    retries = {} if os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE") else {"retries": {"mode": "standard", "total_max_attempts": 3}}
    config = Config(connect_timeout=_seconds("DISTILLERY_S3_CONNECT_TIMEOUT", 10), read_timeout=_seconds("DISTILLERY_S3_READ_TIMEOUT", 60), **retries)
    return boto3.client("s3", config=config)


def s3_endpoint() -> str:
    """The S3 endpoint in use (credentials masked), for messages."""
    try:
        return redact_uri(s3_client().meta.endpoint_url)
    except Exception:  # no region, no botocore: the message goes without it
        return os.environ.get("AWS_ENDPOINT_URL", "the S3 endpoint")


def s3_error(uri: str, err: Exception) -> StorageError:
    code = (getattr(err, "response", None) or {}).get("Error", {}).get("Code", type(err).__name__)
    hints = {
        "NoSuchKey": "no such object",
        "NoSuchBucket": "no such bucket",
        "404": "no such object",
        "403": "access denied (check the credentials)",
        "AccessDenied": "access denied (check the credentials)",
        "InvalidAccessKeyId": "the access key is not known to the server (check the credentials)",
        "SignatureDoesNotMatch": "the secret key does not match (check the credentials)",
        "NoCredentialsError": "no AWS credentials found",
        "EndpointConnectionError": f"the S3 endpoint {s3_endpoint()} cannot be reached (check AWS_ENDPOINT_URL and the network)",
        "ConnectTimeoutError": f"the S3 endpoint {s3_endpoint()} did not accept a connection in time (check AWS_ENDPOINT_URL and the network)",
        "ReadTimeoutError": f"the S3 endpoint {s3_endpoint()} did not answer in time",
        "ConnectionClosedError": f"the S3 endpoint {s3_endpoint()} closed the connection",
    }
    return StorageError(f"{_shown(uri)}: {hints.get(code, code)}")


def read_bytes(uri: str) -> bytes:
    check_uri(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as err:
            raise s3_error(uri, err) from err
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError:
        msg = f"{uri}: no such file"
        raise StorageError(msg) from None
    except IsADirectoryError:
        msg = f"{uri}: is a folder, expected a file"
        raise StorageError(msg) from None
