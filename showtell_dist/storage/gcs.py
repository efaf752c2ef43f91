"""Google Cloud Storage helpers built on google-cloud-storage.

TensorFlow's own gs:// filesystem (``tf.io.gfile``, ``TFRecordDataset``) is the
right tool for reading and writing training data and checkpoints.  This module
covers what it is the wrong tool for:

* `upload_directory`: parallel, resumable, checksum-verified upload of a
  prepared dataset directory, with retries of transient errors;
* `read_object` / `list_directory`: one object, and the files of a directory in
  one object listing (data/dataset_dir.py reads and validates a prepared
  dataset with them);
* `warn_if_bucket_far_from`: warning when the data bucket is in another region
  than the TPU/VM that reads it;
* `make_client` / `split_gs_url`.

Errors the user can fix are `UserError`s (missing bucket, missing permission,
missing credentials), each naming the bucket or file and saying what to do.

``STORAGE_EMULATOR_HOST`` (e.g. ``http://127.0.0.1:9023``) points the client at
a local emulator with anonymous credentials, as google-cloud-storage does.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import http.client
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field

from showtell_dist.errors import UserError

logger = logging.getLogger(__name__)

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
EMULATOR_PROJECT = "showtell-emulator"

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
_RETRYABLE_STATUS = (408, 429, 500, 502, 503, 504)
_HASH_BLOCK = 1 << 20


class UploadError(UserError):
    """An upload did not complete; re-running resumes it."""


# --------------------------------------------------------------------------
# Client and URLs
# --------------------------------------------------------------------------


def make_client(project: str | None = None):
    """A google-cloud-storage client.

    Uses Application Default Credentials, or anonymous credentials and a dummy
    project when ``STORAGE_EMULATOR_HOST`` is set (local emulator).
    """
    from google.cloud import storage

    emulator = os.environ.get(EMULATOR_ENV)
    if emulator:
        from google.auth.credentials import AnonymousCredentials

        if "://" not in emulator:
            emulator = "http://" + emulator
        return storage.Client(
            project=project or EMULATOR_PROJECT,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": emulator},
        )

    from google.auth import exceptions as auth_exceptions

    try:
        if project is None:
            return storage.Client()
        return storage.Client(project=project)
    except auth_exceptions.DefaultCredentialsError as e:
        raise UserError(
            f"no Google Cloud credentials found for Cloud Storage ({e}): run "
            "`gcloud auth application-default login`, or set "
            "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or "
            "run on a GCE/TPU VM whose service account has access"
        ) from e


def is_gs_url(path: str) -> bool:
    return isinstance(path, str) and path.startswith("gs://")


def split_gs_url(url: str) -> tuple[str, str]:
    """``gs://bucket/a/b/`` -> ``("bucket", "a/b")`` (prefix without slashes)."""
    if not is_gs_url(url):
        raise UserError(
            f"{url!r} is not a Cloud Storage URL: write it as gs://BUCKET/PATH "
            "(for example gs://my-bucket/datasets/coco)"
        )
    rest = url[len("gs://"):]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_RE.fullmatch(bucket or ""):
        raise UserError(
            f"{url!r} has no valid bucket name ({bucket!r}): bucket names are 3-222 "
            "lowercase letters, digits, '-', '_' and '.'; write gs://BUCKET/PATH"
        )
    return bucket, prefix.strip("/")


def _object_name(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def _bucket_fix(bucket: str) -> str:
    return (
        f"check that gs://{bucket} exists (create it with `gcloud storage buckets "
        f"create gs://{bucket} --location=REGION`), that your account or the "
        f"VM's service account has roles/storage.objectAdmin on it (`gcloud "
        f"storage buckets add-iam-policy-binding gs://{bucket} --member=... "
        f"--role=roles/storage.objectAdmin`), and that your credentials are "
        f"current (`gcloud auth application-default login`)"
    )


def _access_error(bucket: str, exc: Exception) -> UserError | None:
    """A UserError for a 401/403/404-on-bucket, or None for other errors."""
    from google.api_core import exceptions as gexc

    if isinstance(exc, gexc.NotFound):
        return UserError(
            f"Cloud Storage bucket gs://{bucket} does not exist (404): create it "
            f"with `gcloud storage buckets create gs://{bucket} --location=REGION` "
            f"(REGION = the region of your TPU/VM), or fix the bucket name in the URL"
        )
    if isinstance(exc, (gexc.Forbidden, gexc.Unauthorized)):
        return UserError(
            f"permission denied on Cloud Storage bucket gs://{bucket} "
            f"({exc.code}: {getattr(exc, 'message', exc)}): grant your account or "
            f"the VM's service account roles/storage.objectAdmin on the bucket "
            f"(`gcloud storage buckets add-iam-policy-binding gs://{bucket} "
            f"--member=user:YOU --role=roles/storage.objectAdmin`) and check "
            f"`gcloud auth application-default login`"
        )
    return None


def _resumable_session_lost(exc: Exception) -> bool:
    """A 404 from an expired resumable-upload session (the bucket is fine)."""
    from google.api_core import exceptions as gexc

    if not isinstance(exc, gexc.NotFound):
        return False
    return "upload_id=" in str(getattr(getattr(exc, "response", None), "url", ""))


def _checksum_rejected(exc: BaseException) -> bool:
    """The server refused an upload whose bytes did not match the sent checksum
    (400 "Provided CRC32C/MD5 ... doesn't match"): corrupted in transit."""
    from google.api_core import exceptions as gexc

    if not isinstance(exc, gexc.BadRequest):
        return False
    text = str(exc).lower()
    return ("crc32c" in text or "md5" in text) and "match" in text


def is_transient_error(exc: BaseException) -> bool:
    """True for errors worth retrying: 408/429/5xx, dropped/reset connections."""
    import requests
    import urllib3
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exceptions

    if isinstance(exc, _ChecksumMismatch) or _checksum_rejected(exc):
        return True
    if isinstance(exc, gexc.GoogleAPICallError):
        return exc.code in _RETRYABLE_STATUS or _resumable_session_lost(exc)
    if isinstance(exc, (
        ConnectionError,  # includes ConnectionResetError, BrokenPipeError
        TimeoutError,
        requests.exceptions.ConnectionError,
        requests.exceptions.ChunkedEncodingError,
        requests.exceptions.Timeout,
        http.client.HTTPException,  # RemoteDisconnected, IncompleteRead, ...
        urllib3.exceptions.ProtocolError,
        urllib3.exceptions.TimeoutError,
        urllib3.exceptions.SSLError,
    )):
        return True
    try:
        from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
    except ImportError:  # pragma: no cover - older google-cloud-storage
        DataCorruption = InvalidResponse = ()
    if DataCorruption and isinstance(exc, DataCorruption):
        return True
    if InvalidResponse and isinstance(exc, InvalidResponse):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return status in _RETRYABLE_STATUS
    if isinstance(exc, auth_exceptions.TransportError) and exc.args:
        inner = exc.args[0]
        return isinstance(inner, BaseException) and is_transient_error(inner)
    return False


# --------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class FileDigest:
    size: int
    md5: str  # base64, as GCS reports blob.md5_hash
    crc32c: str  # base64 big-endian, as GCS reports blob.crc32c


def file_digest(path: str) -> FileDigest:
    """Size, base64 md5 and base64 crc32c of a local file, in one pass."""
    import google_crc32c

    md5 = hashlib.md5()
    crc = google_crc32c.Checksum()
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_HASH_BLOCK)
            if not block:
                break
            md5.update(block)
            crc.update(block)
            size += len(block)
    return FileDigest(
        size=size,
        md5=base64.b64encode(md5.digest()).decode("ascii"),
        crc32c=base64.b64encode(crc.digest()).decode("ascii"),
    )


def _remote_matches(blob, digest: FileDigest) -> bool:
    """Does the remote object have the local file's size and checksum?"""
    if blob is None or blob.size is None or int(blob.size) != digest.size:
        return False
    if blob.md5_hash:
        return blob.md5_hash == digest.md5
    if blob.crc32c:  # composite objects have no md5
        return blob.crc32c == digest.crc32c
    return False


class _ChecksumMismatch(Exception):
    pass


# --------------------------------------------------------------------------
# Upload
# --------------------------------------------------------------------------


@dataclass
class UploadReport:
    uploaded: list[str] = field(default_factory=list)  # relative names sent now
    already_complete: list[str] = field(default_factory=list)  # skipped: intact
    retries: int = 0  # transient failures retried (incl. checksum mismatches)


def _local_files(local_dir: str) -> list[tuple[str, str]]:
    """(relative name with '/', absolute path) of every file under local_dir."""
    if not os.path.isdir(local_dir):
        raise UserError(
            f"upload source {local_dir!r} is not a directory: pass the directory "
            "that prepare_data wrote (it contains manifest.json and *.tfrecord)"
        )
    out = []
    for root, dirs, files in os.walk(local_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            out.append((rel, path))
    return out


def _list_blobs(client, bucket: str, prefix: str, delimiter: str | None = None):
    """{object name: blob} under prefix/, in one (paginated) listing."""
    try:
        blobs = client.list_blobs(
            bucket, prefix=f"{prefix}/" if prefix else None, delimiter=delimiter
        )
        return {b.name: b for b in blobs}
    except Exception as e:  # noqa: BLE001 - mapped or re-raised
        err = _access_error(bucket, e)
        if err is not None:
            raise err from e
        raise


def upload_directory(
    local_dir: str,
    gs_url: str,
    *,
    client=None,
    max_workers: int = 8,
    retry_deadline_s: float = 600.0,
    initial_backoff_s: float = 1.0,
    max_backoff_s: float = 32.0,
    max_checksum_failures: int = 3,
) -> UploadReport:
    """Upload every file under local_dir to gs_url/<relative name>, resumably.

    Files whose object already exists with the same size and md5 are skipped
    (so re-running after an interruption sends only what is missing).  Each
    upload is checksum-verified (crc32c sent to the server, md5 and crc32c of
    the stored object compared with the local file).  Transient errors (429,
    5xx, reset or dropped connections, checksum mismatches) are retried with
    exponential backoff until `retry_deadline_s` after that file's first try;
    a missing bucket or missing permission raises one `UserError`.
    """
    bucket_name, prefix = split_gs_url(gs_url)
    files = _local_files(local_dir)
    client = client or make_client()
    bucket = client.bucket(bucket_name)

    existing = _list_blobs(client, bucket_name, prefix)
    report = UploadReport()
    lock = threading.Lock()
    todo = []
    for rel, path in files:
        digest = file_digest(path)
        if _remote_matches(existing.get(_object_name(prefix, rel)), digest):
            report.already_complete.append(rel)
        else:
            todo.append((rel, path, digest))

    def count_retry():
        with lock:
            report.retries += 1

    def upload_one(rel, path, digest):
        name = _object_name(prefix, rel)
        deadline = time.monotonic() + retry_deadline_s
        backoff = initial_backoff_s
        checksum_failures = 0
        attempt = 0
        while True:
            attempt += 1
            blob = bucket.blob(name)
            try:
                blob.upload_from_filename(
                    path,
                    checksum="crc32c",
                    crc32c_checksum_value=digest.crc32c,
                    retry=None,  # retried (and counted) here
                )
                if not _remote_matches(blob, digest):
                    checksum_failures += 1
                    raise _ChecksumMismatch(
                        f"stored object has size={blob.size} md5={blob.md5_hash} "
                        f"crc32c={blob.crc32c}, local file has size={digest.size} "
                        f"md5={digest.md5} crc32c={digest.crc32c}"
                    )
                return rel
            except Exception as e:  # noqa: BLE001 - classified below
                err = _access_error(bucket_name, e)
                if err is not None and not _resumable_session_lost(e):
                    raise err from e
                if not is_transient_error(e):
                    raise
                if _checksum_rejected(e):
                    checksum_failures += 1
                if checksum_failures >= max_checksum_failures:
                    raise UploadError(
                        f"upload of {path} to gs://{bucket_name}/{name} failed "
                        f"checksum verification {checksum_failures} times ({e}): "
                        "check the local file is not being modified, then re-run "
                        "(completed files are skipped)"
                    ) from e
                sleep = min(backoff, max_backoff_s) * (0.5 + random.random() / 2)
                if time.monotonic() + sleep > deadline:
                    raise UploadError(
                        f"upload of {path} to gs://{bucket_name}/{name} still failing "
                        f"after {attempt} attempts in {retry_deadline_s:g}s "
                        f"(last error: {type(e).__name__}: {e}): Cloud Storage or "
                        "the network is unhealthy; re-run the same command to resume "
                        "(completed files are skipped)"
                    ) from e
                logger.info("retrying upload of %s after %s: %s", name,
                            type(e).__name__, e)
                count_retry()
                time.sleep(sleep)
                backoff *= 2

    if todo:
        pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, min(max_workers, len(todo))),
            thread_name_prefix="gcs-upload",
        )
        try:
            futures = [pool.submit(upload_one, *item) for item in todo]
            done = set()
            for fut in concurrent.futures.as_completed(futures):
                done.add(fut.result())  # raises the first failure
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        report.uploaded = [rel for rel, _, _ in todo if rel in done]
    return report


# --------------------------------------------------------------------------
# Reading a directory: one object, one listing
# --------------------------------------------------------------------------


def read_object(url: str, *, client=None) -> bytes:
    """The bytes of the object at gs://bucket/name.

    Raises FileNotFoundError when the bucket exists but the object does not, and
    a `UserError` naming the fix for a missing bucket or a missing permission.
    """
    from google.api_core import exceptions as gexc

    bucket, name = split_gs_url(url)
    client = client or make_client()
    try:
        return client.bucket(bucket).blob(name).download_as_bytes()
    except gexc.NotFound as e:
        if not client.bucket(bucket).exists():
            raise _access_error(bucket, e) from e
        raise FileNotFoundError(url) from e
    except Exception as e:  # noqa: BLE001 - mapped or re-raised
        err = _access_error(bucket, e)
        if err is not None:
            raise err from e
        raise


def list_directory(url: str, *, client=None) -> dict[str, tuple[int, str | None]]:
    """{file name: (size, base64 md5 or None)} of the objects directly under gs://bucket/prefix/,
    in one (paginated) listing."""
    bucket, prefix = split_gs_url(url)
    client = client or make_client()
    blobs = _list_blobs(client, bucket, prefix, delimiter="/")
    cut = len(prefix) + 1 if prefix else 0
    return {
        name[cut:]: (int(b.size or 0), b.md5_hash)
        for name, b in blobs.items()
        if "/" not in name[cut:]
    }


# --------------------------------------------------------------------------
# Bucket location vs compute zone
# --------------------------------------------------------------------------

# Multi-regions and predefined dual-regions -> regions they cover (prefix match
# for the multi-regions).
_MULTI_REGION_PREFIXES = {
    "us": ("us-",),
    "eu": ("europe-",),
    "asia": ("asia-",),
}
_DUAL_REGIONS = {
    "nam4": ("us-central1", "us-east1"),
    "eur4": ("europe-north1", "europe-west4"),
    "eur5": ("europe-west1", "europe-west2"),
    "eur7": ("europe-west2", "europe-west3"),
    "eur8": ("europe-west3", "europe-west6"),
    "asia1": ("asia-northeast1", "asia-northeast2"),
}
_ZONE_RE = re.compile(r"([a-z]+-[a-z]+\d+)(-[a-z])?")


def region_of_zone(zone: str) -> str:
    """``us-central1-b`` -> ``us-central1`` (a region is returned unchanged)."""
    m = _ZONE_RE.fullmatch((zone or "").strip().lower())
    if not m:
        raise UserError(
            f"{zone!r} is not a Google Cloud zone or region: write it like "
            "us-central1-b (zone) or us-central1 (region)"
        )
    return m.group(1)


def location_covers_region(location: str, region: str,
                           data_locations=None) -> bool:
    """Is `region` inside bucket `location` (region, dual- or multi-region)?"""
    loc = (location or "").strip().lower()
    region = region.lower()
    if data_locations:  # configurable dual-region: explicit regions
        return region in {d.lower() for d in data_locations}
    if loc == region:
        return True
    if loc in _DUAL_REGIONS:
        return region in _DUAL_REGIONS[loc]
    if loc in _MULTI_REGION_PREFIXES:
        return region.startswith(_MULTI_REGION_PREFIXES[loc])
    return False


def bucket_location_warning(bucket_name: str, location: str, zone: str,
                            data_locations=None) -> str | None:
    """The warning text for a bucket in `location` read from `zone`, or None."""
    region = region_of_zone(zone)
    if location_covers_region(location, region, data_locations):
        return None
    where = location + (f" ({', '.join(data_locations)})" if data_locations else "")
    return (
        f"bucket gs://{bucket_name} is in {where} but the TPU/VM zone {zone} is in "
        f"region {region}: every training step reads across regions (slower input "
        f"pipeline, egress charges). Copy the data to a bucket in {region} "
        f"(`gcloud storage buckets create gs://NEW --location={region}` then "
        f"`gcloud storage cp -r`), or run in a zone of {location}."
    )


def warn_if_bucket_far_from(bucket_name: str, zone: str, *, client=None) -> str | None:
    """Log and return a warning if the bucket is not in/over the zone's region."""
    from google.api_core import exceptions as gexc

    region_of_zone(zone)  # validate before any request
    client = client or make_client()
    try:
        bucket = client.get_bucket(bucket_name)
    except (gexc.Forbidden, gexc.Unauthorized) as e:
        # objectAdmin cannot read bucket metadata; not worth failing a run over.
        logger.info("cannot read the location of gs://%s (%s); not checking it "
                    "against zone %s", bucket_name, e.code, zone)
        return None
    except gexc.NotFound as e:
        raise _access_error(bucket_name, e) from e
    data_locations = list(bucket.data_locations or []) or None
    message = bucket_location_warning(
        bucket_name, bucket.location or "", zone, data_locations)
    if message:
        logger.warning(message)
    return message
