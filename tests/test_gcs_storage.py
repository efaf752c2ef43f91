"""gs:// support, against gcp-storage-emulator on loopback.

TensorFlow's own gs:// filesystem is exercised in a subprocess through the
loopback TLS-terminating proxy of gcs_testing; google-cloud-storage talks to
the emulator directly or (for fault injection) through the same proxy.
"""

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.parse
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gcs_testing import (  # noqa: E402,F401  (fixtures are used by name)
    GOOGLE_HOSTS,
    gcs_emulator,
    gcs_proxy,
    gcs_tf_env,
    loopback_only,
)

from showtell_dist.data import dataset_dir  # noqa: E402
from showtell_dist.errors import DataError, UserError  # noqa: E402
from showtell_dist.storage import gcs  # noqa: E402

pytestmark = pytest.mark.usefixtures("loopback_only")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def make_dataset(root, train_shards=4, val_shards=2, seed=0):
    """A prepare_data-like directory: shards of random bytes plus manifest.json."""
    os.makedirs(root, exist_ok=True)
    rnd = __import__("random").Random(seed)
    manifest = {"format_version": 1, "splits": {},
                "vocabulary": {"file": "vocab.json", "size": 3}}
    for split, n in (("train", train_shards), ("val", val_shards)):
        shards = []
        for i in range(n):
            name = f"{split}-{i:05d}-of-{n:05d}.tfrecord"
            data = rnd.randbytes(1000 + 700 * i)
            with open(os.path.join(root, name), "wb") as f:
                f.write(data)
            shards.append({"file": name, "records": 5, "bytes": len(data),
                           "md5": _md5_b64(data)})
        manifest["splits"][split] = {"images": 5 * n, "captions": 25 * n,
                                     "shards": shards}
    with open(os.path.join(root, "vocab.json"), "w") as f:
        json.dump(["<pad>", "a", "b"], f)
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return sorted(os.listdir(root))


def remote_md5s(client, bucket, prefix):
    return {
        b.name[len(prefix) + 1:]: b.md5_hash
        for b in client.list_blobs(bucket, prefix=prefix + "/")
    }


def local_md5s(root):
    out = {}
    for name in os.listdir(root):
        with open(os.path.join(root, name), "rb") as f:
            out[name] = _md5_b64(f.read())
    return out


@pytest.fixture
def prefix():
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def proxied_client(gcs_emulator, gcs_proxy, monkeypatch):
    """make_client() through the fault-injecting proxy (STORAGE_EMULATOR_HOST)."""
    gcs_proxy.clear()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_proxy.url)
    yield gcs.make_client()
    gcs_proxy.clear()


def _uploads(proxy):
    return [e for e in proxy.log if e[0] in ("POST", "PUT") and "/upload/" in e[2]]


# --------------------------------------------------------------------------
# TensorFlow's gs:// filesystem through the proxy
# --------------------------------------------------------------------------

TF_SCRIPT = textwrap.dedent(r'''
    import json, sys
    import tensorflow as tf
    root = sys.argv[1]
    out = {}
    with tf.io.gfile.GFile(root + "/x/a.txt", "w") as f:
        f.write("hello gcs")
    out["glob"] = tf.io.gfile.glob(root + "/x/*.txt")
    with tf.io.gfile.GFile(root + "/x/a.txt") as f:
        out["read"] = f.read()
    with tf.io.TFRecordWriter(root + "/x/r.tfrecord") as w:
        for i in range(4):
            w.write(b"record-%d" % i)
    out["records"] = [r.decode() for r in
                      tf.data.TFRecordDataset(root + "/x/r.tfrecord").as_numpy_iterator()]
    # atomic write: temp object, then rename
    with tf.io.gfile.GFile(root + "/x/ckpt.tmp", "w") as f:
        f.write("final")
    tf.io.gfile.rename(root + "/x/ckpt.tmp", root + "/x/ckpt.json", overwrite=True)
    out["renamed"] = [tf.io.gfile.exists(root + "/x/ckpt.tmp"),
                      tf.io.gfile.exists(root + "/x/ckpt.json")]
    tf.io.gfile.makedirs(root + "/d/e")
    out["dirs"] = [tf.io.gfile.exists(root + "/d/e"), tf.io.gfile.isdir(root + "/d"),
                   tf.io.gfile.exists(root + "/nope")]
    # proxy injects 503s on this upload and drops a read connection
    with tf.io.gfile.GFile(root + "/x/faulty.bin", "wb") as f:
        f.write(b"\x00\x01" * 5000)
    with tf.io.gfile.GFile(root + "/x/faulty.bin", "rb") as f:
        out["faulty_len"] = len(f.read())
    print("RESULT " + json.dumps(out))
''')


def test_tf_gfile_and_tfrecords_through_proxy(gcs_emulator, gcs_proxy, gcs_tf_env,
                                              prefix):
    gcs_proxy.clear()
    faulty = urllib.parse.quote(f"{prefix}/x/faulty.bin", safe="")
    gcs_proxy.add_fault("503", 1, rf"POST /upload/.*name={faulty}")
    gcs_proxy.add_fault("drop", 1, rf"GET /download/.*/o/{faulty}\?")
    root = f"gs://{gcs_emulator.bucket}/{prefix}"
    r = subprocess.run([sys.executable, "-c", TF_SCRIPT, root], env=gcs_tf_env,
                       capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["glob"] == [root + "/x/a.txt"]
    assert out["read"] == "hello gcs"
    assert out["records"] == [f"record-{i}" for i in range(4)]
    assert out["renamed"] == [False, True]
    assert out["dirs"] == [True, True, False]
    assert out["faulty_len"] == 10000

    # google-cloud-storage sees the same bytes
    bucket = gcs_emulator.client().bucket(gcs_emulator.bucket)
    assert bucket.blob(f"{prefix}/x/a.txt").download_as_bytes() == b"hello gcs"
    assert bucket.blob(f"{prefix}/x/ckpt.json").download_as_bytes() == b"final"
    assert bucket.blob(f"{prefix}/x/faulty.bin").download_as_bytes() == b"\x00\x01" * 5000
    rec = bucket.blob(f"{prefix}/x/r.tfrecord").download_as_bytes()
    # TFRecord framing: u64 length, u32 crc, data, u32 crc
    assert rec.count(b"record-") == 4 and len(rec) == 4 * (8 + 4 + 8 + 4)
    names = {b.name for b in gcs_emulator.client().list_blobs(
        gcs_emulator.bucket, prefix=prefix + "/")}
    assert f"{prefix}/x/ckpt.tmp" not in names

    # faults were injected and retried; nothing left loopback
    outcomes = [e[3] for e in gcs_proxy.log]
    assert outcomes.count("503") == 1 and outcomes.count("drop") == 1
    assert not gcs_proxy.refused
    assert {e[1] for e in gcs_proxy.log} <= GOOGLE_HOSTS
    # metadata/reads via CONNECT+TLS; upload PUTs to the emulator's plain-http
    # Location via http_proxy
    assert {e[4] for e in gcs_proxy.log} == {"https", "http"}
    assert all(e[4] == "http" for e in gcs_proxy.log if e[0] == "PUT")
    gcs_proxy.clear()


def test_proxy_refuses_other_hosts(gcs_proxy):
    import http.client

    gcs_proxy.clear()
    conn = http.client.HTTPConnection("127.0.0.1", gcs_proxy.port, timeout=5)
    conn.request("GET", "http://example.com/")
    assert conn.getresponse().status == 403
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", gcs_proxy.port, timeout=5)
    conn.request("CONNECT", "example.com:443")
    assert conn.getresponse().status == 403
    conn.close()
    assert len(gcs_proxy.refused) == 2 and not gcs_proxy.log
    gcs_proxy.clear()


# --------------------------------------------------------------------------
# upload_directory
# --------------------------------------------------------------------------


def test_upload_directory_verifies_and_skips_complete_files(
        tmp_path, gcs_emulator, gcs_proxy, proxied_client, prefix):
    files = make_dataset(tmp_path / "d")
    url = f"gs://{gcs_emulator.bucket}/{prefix}"

    report = gcs.upload_directory(str(tmp_path / "d"), url, max_workers=4)
    assert sorted(report.uploaded) == files
    assert report.already_complete == [] and report.retries == 0
    assert remote_md5s(proxied_client, gcs_emulator.bucket, prefix) == \
        local_md5s(tmp_path / "d")

    gcs_proxy.clear()
    again = gcs.upload_directory(str(tmp_path / "d"), url, client=proxied_client)
    assert again.uploaded == [] and sorted(again.already_complete) == files
    assert _uploads(gcs_proxy) == []  # one listing, no data sent


def test_upload_directory_retries_faults_exactly_once(
        tmp_path, gcs_emulator, gcs_proxy, proxied_client, prefix):
    files = make_dataset(tmp_path / "d")

    def fault(action, count, name):  # multipart uploads: name in the body
        gcs_proxy.add_fault(action, count, r"^POST /upload/",
                            body_pattern=f'"name": "{prefix}/{name}"')

    fault("503", 2, "train-00001-of-00004.tfrecord")
    fault("429", 1, "val-00000-of-00002.tfrecord")
    fault("drop", 1, "train-00002-of-00004.tfrecord")
    # the object is stored but the client never hears back: it must re-send
    fault("drop_after_forward", 1, "manifest.json")
    # a byte flipped in transit: the server rejects the crc32c, the client retries
    fault("corrupt", 1, "train-00000-of-00004.tfrecord")

    report = gcs.upload_directory(
        str(tmp_path / "d"), f"gs://{gcs_emulator.bucket}/{prefix}",
        client=proxied_client, max_workers=4, initial_backoff_s=0.02)
    assert sorted(report.uploaded) == files
    assert report.retries == 6
    assert all(rule.hits == rule.count for rule in gcs_proxy.faults)
    blobs = list(proxied_client.list_blobs(gcs_emulator.bucket, prefix=prefix + "/"))
    assert len(blobs) == len(files)  # no duplicates, no leftovers
    assert remote_md5s(proxied_client, gcs_emulator.bucket, prefix) == \
        local_md5s(tmp_path / "d")

    # corruption that does not go away: give up after max_checksum_failures
    gcs_proxy.clear()
    (tmp_path / "d" / "train-00000-of-00004.tfrecord").write_bytes(b"new" * 500)
    fault("corrupt", 1000, "train-00000-of-00004.tfrecord")
    with pytest.raises(gcs.UploadError, match="train-00000-of-00004.tfrecord.*checksum"):
        gcs.upload_directory(
            str(tmp_path / "d"), f"gs://{gcs_emulator.bucket}/{prefix}",
            client=proxied_client, initial_backoff_s=0.01, max_checksum_failures=3)
    assert gcs_proxy.faults[0].hits == 3


def test_interrupted_upload_resumes_with_missing_files_only(
        tmp_path, gcs_emulator, gcs_proxy, proxied_client, prefix):
    files = make_dataset(tmp_path / "d")
    url = f"gs://{gcs_emulator.bucket}/{prefix}"
    bucket = proxied_client.bucket(gcs_emulator.bucket)

    stuck = "train-00003-of-00004.tfrecord"
    gcs_proxy.add_fault("503", 10_000, r"^POST /upload/",
                        body_pattern=f'"name": "{prefix}/{stuck}"')
    with pytest.raises(gcs.UploadError, match=stuck) as exc:
        gcs.upload_directory(str(tmp_path / "d"), url, client=proxied_client,
                             max_workers=8, retry_deadline_s=0.3,
                             initial_backoff_s=0.02)
    assert "re-run" in str(exc.value)
    done_first = set(remote_md5s(proxied_client, gcs_emulator.bucket, prefix))
    assert stuck not in done_first
    # and a stale object (older run, other content) under one shard's name
    stale = "val-00001-of-00002.tfrecord"
    bucket.blob(f"{prefix}/{stale}").upload_from_string(b"old")

    gcs_proxy.clear()
    report = gcs.upload_directory(str(tmp_path / "d"), url, client=proxied_client)
    assert stuck in report.uploaded
    assert stale in report.uploaded  # replaced
    assert set(report.uploaded) | set(report.already_complete) == set(files)
    assert not set(report.uploaded) & set(report.already_complete)
    assert set(report.already_complete) == done_first - {stale}
    assert report.retries == 0
    assert len(_uploads(gcs_proxy)) == len(report.uploaded)
    assert remote_md5s(proxied_client, gcs_emulator.bucket, prefix) == \
        local_md5s(tmp_path / "d")


def test_missing_bucket_and_permission_errors(tmp_path, gcs_emulator, gcs_proxy,
                                              proxied_client):
    make_dataset(tmp_path / "d", train_shards=1, val_shards=1)
    with pytest.raises(UserError, match=r"gs://no-such-bucket-x .*does not exist") as e:
        gcs.upload_directory(str(tmp_path / "d"), "gs://no-such-bucket-x/p",
                             client=proxied_client)
    assert "gcloud storage buckets create gs://no-such-bucket-x" in str(e.value)
    with pytest.raises(UserError, match="gs://no-such-bucket-x"):
        dataset_dir.validate("gs://no-such-bucket-x/p", client=proxied_client)

    gcs_proxy.add_fault("403", 1, r"GET /storage/v1/b/[^/]+/o\?")
    with pytest.raises(UserError, match=r"permission denied .*gs://") as e:
        gcs.upload_directory(str(tmp_path / "d"), f"gs://{gcs_emulator.bucket}/p",
                             client=proxied_client)
    assert "roles/storage.objectAdmin" in str(e.value)
    assert "application-default login" in str(e.value)

    with pytest.raises(UserError, match="gs://BUCKET"):
        gcs.split_gs_url("/local/dir")
    with pytest.raises(UserError, match="bucket name"):
        gcs.split_gs_url("gs:///x")
    assert gcs.split_gs_url("gs://b-1/a/b/") == ("b-1", "a/b")
    assert gcs.split_gs_url("gs://b-1") == ("b-1", "")


# --------------------------------------------------------------------------
# dataset_dir.validate (a prepared dataset against its manifest, with one gs:// listing)
# --------------------------------------------------------------------------


def test_validate_dataset_on_gcs(tmp_path, gcs_emulator, gcs_proxy, proxied_client,
                                 prefix):
    make_dataset(tmp_path / "d")
    url = f"gs://{gcs_emulator.bucket}/{prefix}"
    gcs.upload_directory(str(tmp_path / "d"), url, client=proxied_client)
    bucket = proxied_client.bucket(gcs_emulator.bucket)

    gcs_proxy.clear()
    dataset_dir.validate(url, client=proxied_client)
    listings = [e for e in gcs_proxy.log if e[0] == "GET" and "/o?" in e[2]]
    assert len(listings) == 1  # one listing, not one request per shard

    shard = "train-00001-of-00004.tfrecord"
    blob = bucket.blob(f"{prefix}/{shard}")
    original = blob.download_as_bytes()

    blob.delete()
    with pytest.raises(DataError, match=rf"{shard} is missing.*prepare_data.*re-upload"):
        dataset_dir.validate(url, client=proxied_client)
    dataset_dir.validate(url, client=proxied_client, splits=["val"])  # other split ok

    blob.upload_from_string(original[:-10])
    with pytest.raises(DataError, match=rf"{shard} is truncated"):
        dataset_dir.validate(url, client=proxied_client)

    blob.upload_from_string(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(DataError, match=rf"{shard} is corrupt"):
        dataset_dir.validate(url, client=proxied_client)

    blob.upload_from_string(original)
    dataset_dir.validate(url, client=proxied_client)
    extra = "train-00009-of-00010.tfrecord"
    bucket.blob(f"{prefix}/{extra}").upload_from_string(b"x")
    with pytest.raises(DataError, match=rf"{extra} is not in the manifest"):
        dataset_dir.validate(url, client=proxied_client)
    dataset_dir.validate(url, client=proxied_client, splits="val")

    with pytest.raises(DataError, match="no manifest.json"):
        dataset_dir.validate(url + "/nothing-here", client=proxied_client)


def test_validate_dataset_local(tmp_path):
    d = tmp_path / "d"
    make_dataset(d)
    dataset_dir.validate(str(d), check_local_md5=True)
    manifest = json.loads((d / "manifest.json").read_text())
    dataset_dir.validate(str(d), manifest, splits=["train"])

    shard = d / "val-00001-of-00002.tfrecord"
    data = shard.read_bytes()
    shard.write_bytes(data[:100])
    with pytest.raises(DataError, match=r"val-00001-of-00002.tfrecord is truncated"):
        dataset_dir.validate(str(d))
    shard.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    dataset_dir.validate(str(d))  # same size; md5 only checked on request
    with pytest.raises(DataError, match="is corrupt"):
        dataset_dir.validate(str(d), check_local_md5=True)
    shard.unlink()
    with pytest.raises(DataError, match=r"val-00001-of-00002.tfrecord is missing"):
        dataset_dir.validate(str(d))
    shard.write_bytes(data)
    (d / "val-00002-of-00003.tfrecord").write_bytes(b"leftover")
    with pytest.raises(DataError, match=r"val-00002-of-00003.tfrecord is not in the"):
        dataset_dir.validate(str(d))
    with pytest.raises(DataError, match="split.*test.*not in"):
        dataset_dir.validate(str(d), splits=["test"])
    (d / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest.json"):
        dataset_dir.validate(str(d))


# --------------------------------------------------------------------------
# bucket location vs zone
# --------------------------------------------------------------------------


def test_bucket_location_logic():
    assert gcs.region_of_zone("us-central1-b") == "us-central1"
    assert gcs.region_of_zone("europe-west4") == "europe-west4"
    with pytest.raises(UserError, match="zone"):
        gcs.region_of_zone("central")
    near = [("US-CENTRAL1", "us-central1-b"), ("US", "us-east1-d"),
            ("EU", "europe-west4-a"), ("NAM4", "us-east1-c"),
            ("ASIA", "asia-east1-a")]
    for loc, zone in near:
        assert gcs.bucket_location_warning("b", loc, zone) is None, (loc, zone)
    far = [("US-CENTRAL1", "us-east1-d"), ("EU", "us-central1-a"),
           ("US", "europe-west4-a"), ("NAM4", "us-west1-a"),
           ("US", "northamerica-northeast1-a")]
    for loc, zone in far:
        msg = gcs.bucket_location_warning("b", loc, zone)
        assert msg and "gs://b" in msg and zone in msg and loc in msg, (loc, zone)
    assert gcs.bucket_location_warning(
        "b", "US", "us-west1-a", data_locations=["US-CENTRAL1", "US-EAST1"])


def test_warn_if_bucket_far_from_emulator(gcs_emulator, caplog):
    client = gcs_emulator.client()
    assert gcs.warn_if_bucket_far_from(gcs_emulator.bucket, "us-central1-b",
                                       client=client) is None  # emulator: "US"
    gcs_emulator.create_bucket("showtell-eu", location="EUROPE-WEST4")
    with caplog.at_level("WARNING"):
        msg = gcs.warn_if_bucket_far_from("showtell-eu", "us-central1-b",
                                          client=client)
    assert msg and "EUROPE-WEST4" in msg and "us-central1" in msg
    assert msg in caplog.text
    assert gcs.warn_if_bucket_far_from("showtell-eu", "europe-west4-a",
                                       client=client) is None
    with pytest.raises(UserError, match="gs://absent-bucket"):
        gcs.warn_if_bucket_far_from("absent-bucket", "us-central1-b", client=client)
