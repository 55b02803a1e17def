"""One place that turns a local path or `s3://` URL into a filesystem: the one S3 client setup of raylm's data,
checkpoints (DCP writes through it), metrics and Ray's own run state.

The S3 endpoint comes from `AWS_ENDPOINT_URL`; the region and credentials from the AWS SDK's own resolution
(`AWS_DEFAULT_REGION`/`AWS_REGION`, `~/.aws/config` profiles, instance metadata), with no fallback of raylm's. So AWS,
MinIO, Ceph and moto work unchanged and no credential ever passes through raylm's configs, logs or error messages.
A bucket is never created: a missing one is an error naming it (`check_bucket`), so a typo cannot make a bucket.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import posixpath
import time
import uuid
import re
from dataclasses import dataclass

import pyarrow.fs as pafs

from raylm.errors import DataError, StorageError

_GLOB_CHARS = set("*?[")


def is_s3(path: str) -> bool:
    return path.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path parts with '/', for local paths and URLs alike."""
    return posixpath.join(base.rstrip("/") if base != "/" else base, *parts)


@dataclass(kw_only=True)
class StorageConfig:
    shared_fs: bool = False
    """Local paths are on a filesystem every node of the Ray cluster mounts (NFS, Lustre, a FUSE-mounted bucket).
    Without it, a local path on a cluster of more than one node is refused: each node would read and write its own
    disk."""


@functools.lru_cache(maxsize=None)
def _s3_filesystem(endpoint: str | None) -> pafs.S3FileSystem:
    """pyarrow's S3 (it reads neither AWS_ENDPOINT_URL nor, without `region`, anything but the SDK's chain)."""
    scheme = "https"
    if endpoint and "://" in endpoint:
        scheme, endpoint = endpoint.split("://", 1)
    return pafs.S3FileSystem(
        endpoint_override=endpoint or None,
        scheme=scheme,
        connect_timeout=5,
        request_timeout=60,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    )


def absolute(path: str) -> str:
    """An s3:// URL as is; a local path made absolute here, so another process (a Ray worker with its own working
    directory) reads the same place."""
    return path if is_s3(path) else os.path.abspath(os.path.expanduser(path))


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or an s3:// URL."""
    if is_s3(path):
        fs = _s3_filesystem(os.environ.get("AWS_ENDPOINT_URL"))
        return fs, path[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), absolute(path)


def check_bucket(path: str) -> None:
    """Fail now, naming it, if an s3:// path's bucket does not exist: before a job spends compute it would lose at
    its first write (raylm never creates a bucket, so a typo in its name cannot make one)."""
    if not is_s3(path):
        return
    fs, inner = filesystem(path)
    bucket = inner.split("/", 1)[0]
    try:
        missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except OSError as exc:
        raise StorageError(describe_os_error(exc, path)) from None
    if missing:
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
        raise StorageError(f"bucket {bucket} (of {path}) does not exist at {endpoint}; fix the name or create the "
                           "bucket first (raylm never creates one)")


def describe_os_error(exc: OSError, path: str) -> str:
    """A one-line reason for a failed storage call, without credentials or the SDK's multi-line dump."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if is_s3(path):
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
        return f"{path}: S3 call failed via {endpoint} ({text}); check AWS_ENDPOINT_URL, the bucket name and credentials"
    return f"{path}: {text}"


@dataclass(frozen=True)
class FileEntry:
    """A file found under an input."""

    path: str
    """Local absolute path or s3:// URL."""
    size: int
    key: str
    """Path relative to the input it was found under (its name, if the input is the file): stable across moves."""
    named: bool = False
    """The input was this file itself, not a directory, prefix or glob holding it."""
    source: int = 0
    """Id of the dataset source (the input of the run) the file belongs to; set by dataprep's corpus listing."""


def _url(path: str, fs_path: str) -> str:
    return "s3://" + fs_path if is_s3(path) else fs_path


def _split_glob(path: str) -> tuple[str, str | None]:
    """('base dir', 'pattern relative to it') for a glob; (path, None) if there is no wildcard."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if _GLOB_CHARS & set(part):
            return "/".join(parts[:i]) or "/", "/".join(parts[i:])
    return path, None


def _component_regex(part: str) -> str:
    """Regex for one path component of a glob: `*`, `?` and `[...]` as in fnmatch, but never matching '/', nor a
    leading '.' unless the component starts with one (a shell's `*.py` skips `.hidden.py`)."""
    out, i = [] if part.startswith(".") else [r"(?!\.)"], 0
    while i < len(part):
        c, i = part[i], i + 1
        end = part.find("]", i + 1 + part.startswith("!", i)) if c == "[" else -1  # a ']' first in [...] is literal
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif end > 0:
            body, i = part[i:end], end + 1
            negate = body.startswith("!")
            out.append("(?!/)[" + "^" * negate + re.sub(r"([\\\[\]^&~|])", r"\\\1", body[negate:]) + "]")
        else:
            out.append(re.escape(c))
    return "".join(out)


def _glob_regex(pattern: str) -> re.Pattern:
    """A compiled regex for a glob relative to its base directory, with shell semantics.

    fnmatch's `*` crosses '/', so `corpus/*.txt` would silently take nested files, and Python 3.11 has no
    `glob.translate`; hence this: wildcards stay inside one folder, and `**` as a whole component spans zero or more
    folders (`a/**/*.txt` takes `a/x.txt` and `a/b/c/x.txt`; a trailing `**` takes every file below).
    """
    *folders, name = pattern.split("/")
    visible = r"(?!\.)[^/]+"  # `**` does not go into hidden folders (.git, .venv) either
    regex = "".join(f"(?:{visible}/)*" if part == "**" else _component_regex(part) + "/" for part in folders)
    return re.compile(regex + (f"(?:{visible}/)*{visible}" if name == "**" else _component_regex(name)))


def _listing(fs: pafs.FileSystem, fs_base: str, pattern: str | None) -> list[pafs.FileInfo]:
    """Everything under `fs_base` that `pattern` could match.

    Without `**`, only as deep as the pattern has components and only into folders matching theirs, so `corpus/*.txt`
    lists one folder rather than corpus's whole tree (pyarrow's Python FileSelector takes no depth limit).
    """
    if pattern is None or "**" in pattern.split("/"):
        return fs.get_file_info(pafs.FileSelector(fs_base, recursive=True, allow_not_found=True))
    found, dirs = [], [fs_base]
    for part in pattern.split("/"):
        level = [f for d in dirs for f in fs.get_file_info(pafs.FileSelector(d, allow_not_found=True))]
        found += level
        folder = re.compile(_component_regex(part))
        dirs = [f.path for f in level if f.type == pafs.FileType.Directory and folder.fullmatch(f.base_name)]
    return found


def list_files(path: str) -> list[FileEntry]:
    """Every file a user means by `path`: the file itself, all files under a directory or prefix, or a glob's matches.

    Sorted by path, so what is read never depends on the listing order of the filesystem.
    """
    base, pattern = _split_glob(path)
    fs, fs_base = filesystem(base)
    try:
        info = fs.get_file_info(fs_base)
        if info.type == pafs.FileType.File and pattern is None:
            return [FileEntry(_url(path, info.path), info.size, posixpath.basename(info.path), named=True)]
        if info.type == pafs.FileType.NotFound and not is_s3(path):
            raise DataError(f"input {path} does not exist; check the path")
        found = _listing(fs, fs_base, pattern)
    except OSError as exc:
        raise StorageError(describe_os_error(exc, path)) from None
    regex = _glob_regex(pattern) if pattern else None
    entries = []
    for f in found:
        if f.type != pafs.FileType.File:
            continue
        rel = f.path[len(fs_base):].lstrip("/")
        if regex is None or regex.fullmatch(rel):
            entries.append(FileEntry(_url(path, f.path), f.size, rel))
    if not entries:
        raise DataError(f"input {path} matches no files; check the path, glob or s3:// prefix")
    return sorted(entries, key=lambda e: e.path)


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with fs.open_input_stream(p, compression=None) as f:
        return f.read()


TEMPORARY = ".tmp-"


def temporary_name(path: str) -> str:
    """A name to write `path` under before renaming it into place; unique, so two writers never share one."""
    return f"{path}{TEMPORARY}{uuid.uuid4().hex[:12]}"


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file; on local disk via a temp name and a rename, so readers never see half of it."""
    fs, p = filesystem(path)
    tmp = p if is_s3(path) else temporary_name(p)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    with fs.open_output_stream(tmp, compression=None) as f:
        f.write(data)
    if tmp != p:
        fs.move(tmp, p)


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    try:
        return fs.get_file_info(p).type != pafs.FileType.NotFound
    except OSError as exc:
        raise StorageError(describe_os_error(exc, path)) from None


def is_file(path: str) -> bool:
    fs, p = filesystem(path)
    try:
        return fs.get_file_info(p).type == pafs.FileType.File
    except OSError as exc:
        raise StorageError(describe_os_error(exc, path)) from None


def parent(path: str) -> str:
    """The folder holding `path` (an s3:// URL keeps its scheme)."""
    return posixpath.dirname(path.rstrip("/"))


def size(path: str) -> int | None:
    """Size in bytes of a file, or None if it does not exist."""
    fs, p = filesystem(path)
    try:
        info = fs.get_file_info(p)
    except OSError as exc:
        raise StorageError(describe_os_error(exc, path)) from None
    return None if info.type == pafs.FileType.NotFound else info.size


def list_dirs(path: str) -> list[str]:
    """The sub-directories directly under `path` (none if it does not exist), as paths or s3:// URLs."""
    fs, p = filesystem(path)
    try:
        found = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    except OSError as exc:
        raise StorageError(describe_os_error(exc, path)) from None
    return sorted(_url(path, f.path) for f in found if f.type == pafs.FileType.Directory)


def delete_dir(path: str) -> None:
    _delete(path, directory=True)


def delete_empty_dir(path: str) -> None:
    """Remove a local directory if it is empty (an S3 prefix with nothing under it does not exist anyway)."""
    if not is_s3(path):
        with contextlib.suppress(OSError):
            os.rmdir(absolute(path))


def delete_file(path: str) -> None:
    _delete(path, directory=False)


def _delete(path: str, *, directory: bool) -> None:
    """Delete a file or a directory tree; one already gone is no error."""
    fs, p = filesystem(path)
    try:
        fs.delete_dir(p) if directory else fs.delete_file(p)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StorageError(describe_os_error(exc, path)) from None


class PreconditionFailed(Exception):
    """A conditional write or delete lost: the object exists (for a create), or is no longer the version it was read
    as. Not an OSError: a storage failure may be retried, a lost race must not be."""


class NoConditionalWrites(Exception):
    """The store refuses conditional writes (an S3-compatible store without If-None-Match / If-Match)."""


@functools.lru_cache(maxsize=None)
def _s3_client(endpoint: str | None):
    """boto3's S3 client, for the few calls pyarrow's S3FileSystem cannot make (conditional PUT and DELETE); the same
    endpoint, region and credential resolution as `_s3_filesystem`."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint or None, config=Config(
        connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"}))


def _bucket_key(path: str) -> tuple[str, str]:
    bucket, _, key = path[len("s3://"):].partition("/")
    return bucket, key


@contextlib.contextmanager
def _s3_call(path: str):
    """botocore's errors as raylm's: a lost condition as PreconditionFailed, a refused one as NoConditionalWrites, any
    other failure (unreachable endpoint, denied, 5xx after retries) as an OSError with a one-line reason."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise PreconditionFailed(path) from None
        if code in ("NoSuchKey", "404") or status == 404:
            raise FileNotFoundError(path) from None
        if status in (400, 501) and code in ("NotImplemented", "InvalidArgument", "InvalidRequest"):
            raise NoConditionalWrites(f"{path}: {code}") from None
        raise OSError(f"{code or status}: {exc}") from None
    except BotoCoreError as exc:
        raise OSError(str(exc)) from None


def read_versioned(path: str) -> tuple[bytes, str] | None:
    """(contents, version) of a small file, or None if there is none: the version is what `write_if` and `delete_if`
    compare with (S3: the ETag; local: a hash of the contents, read under the file's lock)."""
    if is_s3(path):
        bucket, key = _bucket_key(path)
        try:
            with _s3_call(path):
                got = _s3_client(os.environ.get("AWS_ENDPOINT_URL")).get_object(Bucket=bucket, Key=key)
                return got["Body"].read(), got["ETag"]
        except FileNotFoundError:
            return None
    with _locked(absolute(path), create=False) as f:
        data = f.read() if f is not None else b""
    return (data, _local_version(data)) if data else None


def write_if(path: str, data: bytes, *, version: str | None) -> str:
    """Write a small file only if it is still at `version` (None: only if there is none); returns the new version.
    Raises PreconditionFailed if another writer came first. On S3 a conditional PUT (If-Match / If-None-Match); on a
    local or shared filesystem, compare and write under an exclusive lock of the file itself (flock)."""
    if is_s3(path):
        bucket, key = _bucket_key(path)
        condition = {"IfMatch": version} if version is not None else {"IfNoneMatch": "*"}
        with _s3_call(path):
            return _s3_client(os.environ.get("AWS_ENDPOINT_URL")).put_object(
                Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
    with _locked(absolute(path), create=True) as f:
        current = f.read()
        if (_local_version(current) if current else None) != version:
            raise PreconditionFailed(path)
        _replace_whole(absolute(path), data)
    return _local_version(data)


def _replace_whole(path: str, data: bytes) -> None:
    """Put `data` in place of the file by a rename, under the old file's lock: a reader that takes no lock (a lease
    check, a person's `cat`) sees the old bytes or the new, never a file cut short (an in-place rewrite showed
    them an empty one: a job's own lease read as held by nobody). A writer waiting for the lock then finds the old
    file unlinked and opens the new one (see _locked)."""
    tmp = temporary_name(path)
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def delete_if(path: str, *, version: str) -> None:
    """Delete a small file only if it is still at `version`; PreconditionFailed otherwise (gone already is fine)."""
    if is_s3(path):
        bucket, key = _bucket_key(path)
        try:
            with _s3_call(path):
                _s3_client(os.environ.get("AWS_ENDPOINT_URL")).delete_object(Bucket=bucket, Key=key, IfMatch=version)
        except FileNotFoundError:
            pass
        return
    with _locked(absolute(path), create=False) as f:
        if f is None:
            return
        current = f.read()
        if current and _local_version(current) != version:
            raise PreconditionFailed(path)
        os.unlink(absolute(path))  # under the lock: a writer waiting for it then finds an unlinked file (see _locked)


def _local_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


LOCK_WAIT_S = 30.0
"""A local record's lock is held for the microseconds of one read or write; a holder that keeps it this long was
stopped or hung in the middle of one."""


def lock_within(fd: int, path: str, seconds: float) -> None:
    """An exclusive flock on `fd`, or a StorageError once `seconds` have passed without it: waiting for ever on a
    process that was stopped (SIGSTOP, a debugger, a frozen VM) while writing would hang this one without a word."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise StorageError(f"{path} has been locked by another process for {seconds:g} s: a job stopped "
                                   "or hung while writing it; resume or end that job (if none runs, delete "
                                   f"{path})") from None
            time.sleep(0.01)


@contextlib.contextmanager
def _locked(path: str, *, create: bool):
    """The file opened for reading and writing under an exclusive flock (None if it does not exist and not `create`).
    A file unlinked while this waited for its lock is opened again, so every holder of the lock sees the live file."""
    while True:
        if create:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            yield None
            return
        with os.fdopen(fd, "r+b") as f:
            lock_within(f.fileno(), path, LOCK_WAIT_S)
            if os.fstat(f.fileno()).st_nlink == 0:  # deleted while we waited: try the live file
                continue
            yield f
            return


_CONDITIONAL: dict[tuple[str | None, str], bool] = {}
"""Whether each (endpoint, bucket) honours conditional writes, once probed."""


def _s3_conditional_writes(path: str) -> bool:
    """Whether the store of `path`'s bucket honours If-None-Match: a probe object beside `path` (where the job may
    write) written twice, the second time only if absent, must be refused. A store that ignores the condition, or
    refuses it as unknown, is detected here, once per bucket."""
    key = (os.environ.get("AWS_ENDPOINT_URL"), _bucket_key(path)[0])
    if key not in _CONDITIONAL:
        probe = temporary_name(path)
        try:
            write_bytes(probe, b"1")
            write_if(probe, b"2", version=None)
            _CONDITIONAL[key] = False  # overwritten: the condition was ignored
        except PreconditionFailed:
            _CONDITIONAL[key] = True
        except NoConditionalWrites:
            _CONDITIONAL[key] = False
        finally:
            with contextlib.suppress(OSError, StorageError):
                delete_file(probe)
    return _CONDITIONAL[key]


def conditional_writes(path: str) -> bool:
    """Whether `write_if` / `delete_if` are atomic where `path` lies: always on a local or shared filesystem (flock);
    on S3 if boto3 is installed and the store honours If-None-Match / If-Match (AWS since 2024, MinIO, moto;
    probed once per bucket, beside `path`)."""
    if not is_s3(path):
        return True
    try:
        import boto3  # noqa: F401
    except ImportError:
        return False
    return _s3_conditional_writes(path)
