"""Reading and writing bytes at a local path or an ``s3://bucket/key`` URI (boto3).

boto3 takes its credentials and endpoint from the usual places (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL`` for an S3-compatible server, profiles), so nothing here handles secrets.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from urllib.parse import urlparse


class StorageError(OSError):
    """An object could not be read or written; the message names the URI and the cause."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        msg = f"{uri}: an S3 URI needs a bucket, as in s3://bucket/key"
        raise StorageError(msg)
    return parsed.netloc, parsed.path.lstrip("/")


@cache
def s3_client():
    import boto3

    return boto3.client("s3")


def s3_error(uri: str, err: Exception) -> StorageError:
    code = getattr(err, "response", {}).get("Error", {}).get("Code", type(err).__name__)
    hints = {
        "NoSuchKey": "no such object",
        "NoSuchBucket": "no such bucket",
        "404": "no such object",
        "403": "access denied (check the credentials)",
        "AccessDenied": "access denied (check the credentials)",
        "InvalidAccessKeyId": "the access key is not known to the server (check the credentials)",
        "SignatureDoesNotMatch": "the secret key does not match (check the credentials)",
        "NoCredentialsError": "no AWS credentials found",
        "EndpointConnectionError": "the S3 endpoint cannot be reached",
    }
    return StorageError(f"{uri}: {hints.get(code, code)}")


def read_bytes(uri: str) -> bytes:
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
