"""The versioned store: ``STORE/NAME/vNNNN/{manifest.json, data/, rejects/, card.md}``.

Tags name versions without copying data: ``latest`` is always the newest complete version, and
user tags (``STORE/NAME/_tags/TAG.json``, one small object each, rewritten atomically) point at
one version until they are moved. Everything that reads a version takes ``vNNNN``, ``latest`` or
a tag; URIs name a tag as ``STORE/NAME@TAG``.

A store is a local folder or ``s3://bucket/prefix``. A version is complete if and only if its
``manifest.json`` exists, and the manifest is written last, so readers never see half a
version. A publisher claims a version number with an exclusive write (``O_EXCL`` on disk,
``If-None-Match: *`` on S3) before writing anything else, so two publishers never share one;
a publish that dies leaves a claimed, manifest-less number that readers skip and that is never
reused.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from distillery.uri_io import StorageError, check_uri, is_s3, s3_client, s3_error, split_s3

VERSION_DIR = re.compile(r"^v(\d{4,})$")
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
TAGS_DIR = "_tags"


class VersionNotFound(LookupError):
    pass


def _check_key(key: str) -> str:
    """A key inside the store: relative, no ``..`` segment, no backslash or NUL; else ValueError.

    Keys come from data set names, versions, tags and manifests (shard and plot paths); a
    manifest that names ``../../x`` must not make a reader (the UI, ``read_shards``) open a file
    outside the store."""
    if key.startswith("/") or "\\" in key or "\x00" in key or ".." in key.split("/"):
        msg = f"store key {key!r}: must be a relative path inside the store, without '..' (refused: it would leave the store)"
        raise ValueError(msg)
    return key


def check_name(name: str) -> str:
    if not NAME.match(name) or ".." in name:
        msg = f"data set name {name!r}: use 1-64 of a-z 0-9 . _ - starting with a letter or digit"
        raise ValueError(msg)
    return name


class Store:
    """Bytes by key under a root (a folder or an S3 prefix)."""

    def __init__(self, root: str) -> None:
        check_uri(root)  # no credentials in a store URI, no scheme other than s3://
        self.root = root.rstrip("/") if is_s3(root) else str(Path(root).expanduser().resolve())
        if is_s3(self.root):
            self.bucket, self.prefix = split_s3(self.root + "/")
            if ".." in self.prefix.split("/"):
                msg = f"store {self.root}: '..' is not allowed in an S3 store URI (S3 keys are not paths)"
                raise ValueError(msg)

    def uri(self, key: str) -> str:
        return f"{self.root}/{key}"

    # -- primitive operations ------------------------------------------------------------
    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> bool:
        """Write ``data`` at ``key`` atomically. With ``exclusive``, return False if it exists."""
        _check_key(key)
        if is_s3(self.root):
            extra = {"IfNoneMatch": "*"} if exclusive else {}
            try:
                s3_client().put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, **extra)
            except Exception as err:
                code = (getattr(err, "response", None) or {}).get("Error", {}).get("Code")
                if exclusive and code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    return False
                raise s3_error(self.uri(key), err) from err
            return True
        path = Path(self.root, key)
        written = None  # the file this call created, removed again if the write fails
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if exclusive:
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                written = path
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                return True
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            written = Path(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # readers see the old file or the whole new one
            return True
        except OSError as err:
            if written is not None:
                written.unlink(missing_ok=True)  # no half-written file (hidden or not) stays behind
            raise local_write_error(self.root, key, err) from None

    def get(self, key: str) -> bytes:
        _check_key(key)
        if is_s3(self.root):
            try:
                return s3_client().get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
            except Exception as err:
                raise s3_error(self.uri(key), err) from err
        try:
            return Path(self.root, key).read_bytes()
        except FileNotFoundError:
            msg = f"{self.uri(key)}: no such file"
            raise StorageError(msg) from None

    def exists(self, key: str) -> bool:
        _check_key(key)
        if is_s3(self.root):
            try:
                s3_client().head_object(Bucket=self.bucket, Key=self.prefix + key)
            except Exception as err:
                code = (getattr(err, "response", None) or {}).get("Error", {}).get("Code")
                if code in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise s3_error(self.uri(key), err) from err
            return True
        return Path(self.root, key).is_file()

    def delete(self, key: str) -> None:
        _check_key(key)
        if is_s3(self.root):
            try:
                s3_client().delete_object(Bucket=self.bucket, Key=self.prefix + key)
            except Exception as err:
                raise s3_error(self.uri(key), err) from err
            return
        Path(self.root, key).unlink(missing_ok=True)

    def children(self, key: str) -> list[str]:
        """Names directly under ``key`` (folders and files)."""
        _check_key(key)
        if is_s3(self.root):
            names: set[str] = set()
            paginator = s3_client().get_paginator("list_objects_v2")
            prefix = self.prefix + (key.rstrip("/") + "/" if key else "")
            try:
                for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                    names.update(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
                    names.update(o["Key"][len(prefix) :] for o in page.get("Contents", []))
            except Exception as err:
                raise s3_error(self.uri(key), err) from err
            return sorted(names)
        folder = Path(self.root, key)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    # -- versions ----------------------------------------------------------------------
    def datasets(self) -> list[str]:
        return [n for n in self.children("") if NAME.match(n) and self.versions(n)]

    def _version_numbers(self, dataset: str) -> list[int]:
        return sorted(int(m.group(1)) for n in self.children(check_name(dataset)) if (m := VERSION_DIR.match(n)))

    def versions(self, dataset: str) -> list[str]:
        """Complete versions (those with a manifest), oldest first."""
        return [f"v{n:04d}" for n in self._version_numbers(dataset) if self.exists(f"{dataset}/v{n:04d}/manifest.json")]

    def claim_version(self, dataset: str, run_id: str) -> str:
        """Reserve the next version number for this run; never the same number twice."""
        numbers = self._version_numbers(dataset)
        n = (numbers[-1] + 1) if numbers else 1
        while not self.put(f"{dataset}/v{n:04d}/_claim", run_id.encode(), exclusive=True):
            n += 1
        return f"v{n:04d}"

    # -- tags --------------------------------------------------------------------------
    def tags(self, dataset: str) -> dict[str, str]:
        """User tags of a data set: tag -> version."""
        names = self.children(f"{check_name(dataset)}/{TAGS_DIR}")
        tags = {}
        for name in names:
            if name.endswith(".json") and NAME.match(name[:-5]):
                tags[name[:-5]] = json.loads(self.get(f"{dataset}/{TAGS_DIR}/{name}"))["version"]
        return tags

    def tag(self, dataset: str, tag: str, ref: str) -> str:
        """Point ``tag`` at the version ``ref`` names (a version, ``latest`` or another tag),
        moving it if it exists; return that version. No data is copied."""
        _check_tag(tag)
        version = self.manifest(dataset, ref)["version"]
        body = {"tag": tag, "version": version, "updated_at": datetime.now(UTC).isoformat(timespec="seconds")}
        self.put(f"{dataset}/{TAGS_DIR}/{tag}.json", (json.dumps(body) + "\n").encode())
        return version

    def untag(self, dataset: str, tag: str) -> None:
        _check_tag(tag)
        key = f"{check_name(dataset)}/{TAGS_DIR}/{tag}.json"
        if not self.exists(key):
            raise VersionNotFound(f"{self.uri(dataset)}: no tag {tag!r}")
        self.delete(key)

    def resolve(self, dataset: str, ref: str = "latest") -> str:
        """The version ``ref`` names: ``vNNNN``, ``latest`` or a tag."""
        if ref == "latest" or VERSION_DIR.match(ref):
            return ref
        key = f"{check_name(dataset)}/{TAGS_DIR}/{_check_tag(ref)}.json"
        if not self.exists(key):
            msg = f"{self.uri(dataset)}: no version or tag {ref!r} (tags: {sorted(self.tags(dataset)) or 'none'})"
            raise VersionNotFound(msg)
        return json.loads(self.get(key))["version"]

    def manifest(self, dataset: str, version: str = "latest") -> dict:
        version = self.resolve(dataset, version)
        if version == "latest":
            versions = self.versions(dataset)
            if not versions:
                msg = f"{self.uri(dataset)}: no published versions"
                raise VersionNotFound(msg)
            version = versions[-1]
        key = f"{check_name(dataset)}/{version}/manifest.json"
        if not VERSION_DIR.match(version) or not self.exists(key):
            msg = f"{self.uri(dataset)}/{version}: no such version (or not completely published)"
            raise VersionNotFound(msg)
        return json.loads(self.get(key))


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def local_write_error(root: str, key: str, err: OSError) -> StorageError:
    """One line for a failed write under a local store: the store, the cause, the key. A full
    disk (or quota, or file-size limit) says "no space left"."""
    if err.errno in _NO_SPACE:
        why = "no space left on device" if err.errno == errno.ENOSPC else f"no space left ({err.strerror.lower() if err.strerror else err})"
    else:
        why = (err.strerror or str(err)).lower()
    return StorageError(f"store {root}: {why} (writing {key})")


def _check_tag(tag: str) -> str:
    if tag == "latest" or VERSION_DIR.match(tag) or not NAME.match(tag) or ".." in tag:
        msg = f"tag {tag!r}: use 1-64 of a-z 0-9 . _ - starting with a letter or digit; not 'latest' (always the newest version) or a version name"
        raise ValueError(msg)
    return tag


def default_store() -> str:
    return os.environ.get("DISTILLERY_STORE", "store")


def parse_version_uri(uri: str, *, default_version: str | None = None) -> tuple[Store, str, str] | None:
    """``STORE/NAME/vNNNN`` -> (store, name, version); ``STORE/NAME@TAG`` -> (store, name, TAG)
    (``Store.manifest`` resolves a tag). ``STORE/NAME`` gives ``default_version`` (e.g.
    ``"latest"``) when one is given; otherwise a URI that names no version gives None.

    A version URI with ``..`` after its start (``STORE/../other/v0001``) is a ValueError."""
    uri = uri.rstrip("/")
    parts = uri.rsplit("/", 2)
    if len(parts) == 3 and VERSION_DIR.match(parts[2]):
        _check_version_uri(uri)
        return Store(parts[0]), parts[1], parts[2]
    if "/" in uri and "@" in uri.rsplit("/", 1)[1]:
        _check_version_uri(uri)
        root, last = uri.rsplit("/", 1)
        name, tag = last.split("@", 1)
        return Store(root), name, tag
    if default_version is None or "/" not in uri:
        return None
    _check_version_uri(uri)
    root, name = uri.rsplit("/", 1)
    return Store(root), name, default_version


def _check_version_uri(uri: str) -> None:
    """Refuse a version URI that climbs out of a folder it named (``STORE/../other/v0001``,
    ``STORE/NAME@TAG/../..``): what it names would not be a version of the store it spells.
    Only a local path may start with ``../`` (relative to the working folder); an S3 URI may not
    have ``..`` at all."""
    segments = uri.removeprefix("s3://").split("/") if is_s3(uri) else uri.split("/")
    leading = 0 if is_s3(uri) else next((i for i, seg in enumerate(segments) if seg not in ("..", ".")), len(segments))
    if ".." in segments[leading:]:
        msg = f"version URI {uri!r}: '..' is not allowed after the start of a version URI; give the store's own path, as in STORE/NAME/vNNNN"
        raise ValueError(msg)


def open_version(uri: str, *, what: str) -> tuple[Store, dict]:
    """The store and manifest of ``STORE/NAME/vNNNN``, ``STORE/NAME@TAG`` or ``STORE/NAME``
    (its latest version); ``what`` names the setting in the error for anything else."""
    ref = parse_version_uri(uri, default_version="latest")
    if ref is None:
        msg = f"{what} {uri!r}: expected a published version, STORE/NAME, STORE/NAME/vNNNN or STORE/NAME@TAG"
        raise ValueError(msg)
    store, name, version = ref
    return store, store.manifest(name, version)
