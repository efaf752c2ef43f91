"""Uploads a locally prepared dataset to a bucket, then checks the bucket against its manifest.

  python launch/prepare_data.py --input_dir=flickr8k --output_dir=/data/f8k_records
  python launch/upload_data.py --local_dir=/data/f8k_records --gs_url=gs://BUCKET/f8k_records

Shards go up in parallel, each verified by checksum; objects already complete
in the bucket are not sent again, so an interrupted upload resumes where it
stopped. Transient errors (429, 5xx, dropped connections) are retried with
backoff. (prepare_data.py can also write to gs:// directly.)
"""

import _bootstrap  # noqa: F401
from absl import app, flags

import cli

_LOCAL = flags.DEFINE_string("local_dir", None, "A dataset written by prepare_data.py.", required=True)
_GS_URL = flags.DEFINE_string("gs_url", None, "gs://bucket/prefix to upload into.", required=True)
_WORKERS = flags.DEFINE_integer("num_workers", 8, "Parallel uploads.")
_ZONE = flags.DEFINE_string("zone", None, "Zone of the TPU/VMs that will read it (e.g. us-central1-b): "
                            "warns when the bucket is in another region.")


def main(argv):
    del argv
    with cli.user_errors():
        from showtell_dist.data import dataset_dir
        from showtell_dist.storage import gcs

        manifest = dataset_dir.load_manifest(_LOCAL.value)  # refuse to upload something that is not a dataset
        report = gcs.upload_directory(_LOCAL.value, _GS_URL.value, max_workers=_WORKERS.value)
        print(f"uploaded {len(report.uploaded)} file(s), {len(report.already_complete)} already complete, "
              f"{report.retries} retried request(s)")
        dataset_dir.validate(_GS_URL.value, manifest)
        print(f"{_GS_URL.value} matches its manifest")
        if _ZONE.value:
            bucket, _ = gcs.split_gs_url(_GS_URL.value)
            warning = gcs.warn_if_bucket_far_from(bucket, _ZONE.value)
            if warning:
                print(f"warning: {warning}")


if __name__ == "__main__":
    app.run(main)
