"""What a job leaves in S3 (moto's server, through boto3) when storing its outputs fails, and how long it tries."""

from __future__ import annotations

import pytest

from tests.support import data_url, objects, photo
from worker.errors import InputNotFound, JobError, StorageError
from worker.stack import free_port
from worker.storage import S3Sink, StorageFetcher, s3_client

pytestmark = pytest.mark.slow  # S3 over HTTP (moto's server) and retries that wait


class RefusingSink(S3Sink):
    """The real S3 sink, with one object's write refused (a fault the test injects: S3 stays real)."""

    def __init__(self, refused: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.refused = refused

    def put(self, name: str, data: bytes, content_type: str):
        if name.startswith(self.refused):
            raise StorageError(f"writing s3://{self.bucket}/{self.prefix}/{name} failed after 5 tries: SlowDown")
        return super().put(name, data, content_type)


@pytest.mark.parametrize("refused", ["1.png", "result.json"])
def test_a_job_that_fails_while_storing_leaves_no_outputs_behind(stack, runner, refused):
    settings = stack.settings(model=runner.settings.model)
    job_id = f"partial-{refused.split('.')[0]}"
    sink = RefusingSink(refused, settings, job_id, "outputs", "jobs", stack.s3.client())
    with pytest.raises(JobError) as caught:
        runner.run(settings=settings, sink=sink, num_images_per_prompt=3, job_id=job_id)
    assert caught.value.code == "storage_error" and refused in caught.value.message
    assert objects(stack, job_id) == {}  # the images that were stored are removed: nothing lists them


def test_a_preview_that_cannot_be_stored_stops_previews_not_the_job(stack, runner, caplog):
    settings = stack.settings(model=runner.settings.model)
    sink = RefusingSink("previews/", settings, "previewless", "outputs", "jobs", stack.s3.client())
    result = runner.run(settings=settings, sink=sink, preview_every=1, job_id="previewless")
    assert [image.location for image in result.images] == ["s3://outputs/jobs/previewless/0.png"]
    assert sorted(objects(stack, "previewless")) == ["jobs/previewless/0.png", "jobs/previewless/result.json"]
    assert len([r for r in caplog.records if "previews stop" in r.message]) == 1  # tried once, not every step


def test_storage_retries_stop_at_the_jobs_deadline_plus_margin(runner, monkeypatch):
    """S3 unreachable with a budget of 40 tries: the job stops retrying when its deadline and margin are spent,
    so it cannot outlive Redis's visibility timeout and be handed to a second worker while it still runs."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    settings = runner.settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{free_port()}",
                                                  "storage_attempts": 40, "storage_backoff_s": 0.2,
                                                  "deadline_margin_s": 1.0})
    sink = S3Sink(settings, "late-1", "outputs", "jobs", s3_client(settings))
    with pytest.raises(StorageError) as caught:
        runner.run(settings=settings, sink=sink, image=data_url(photo()), deadline_s=4)
    message = caught.value.message
    assert "no time left for another before the job's deadline" in message, message
    tries = int(message.split("failed after ")[1].split(" tries")[0])
    assert 2 <= tries <= 6  # 0.2 + 0.4 + 0.8 + 1.6 s of waits fit in 5 s; 40 tries would take days


def test_a_missing_s3_input_is_named_without_its_query(stack):
    """A reference copied from a presigned URL carries its signature in the query: errors (task state, logs) omit it."""
    fetcher = StorageFetcher(stack.settings(), stack.s3.client())
    with pytest.raises(InputNotFound) as caught:
        fetcher.fetch("s3://inputs/no-such-photo.png?X-Amz-Signature=deadbeef", "image")
    assert caught.value.message == "image: no object at s3://inputs/no-such-photo.png?..."


@pytest.mark.parametrize("public", [False, True], ids=["workers-endpoint", "public-endpoint"])
def test_result_urls_are_signed_for_the_endpoint_browsers_reach(stack, public, monkeypatch):
    """INPAINT_S3_PUBLIC_ENDPOINT_URL: the workers reach S3 by one name (http://minio:9000 in compose), browsers by
    another; a signature covers the host, so the URL is signed for the public name. Here `localhost` reaches the same
    S3 as the workers' 127.0.0.1, and the URL fetches the stored bytes."""
    import urllib.request

    from worker.stack import TEST_CREDENTIALS

    for name, value in TEST_CREDENTIALS.items():  # the workers' credentials sign, whatever the name
        monkeypatch.setenv(name, value)
    endpoint = f"http://localhost:{stack.s3.port}" if public else stack.s3.endpoint
    settings = stack.settings(s3_public_endpoint_url=endpoint if public else None)
    sink = S3Sink(settings, f"signed-{public}", "outputs", "jobs", stack.s3.client())
    location, url = sink.put("0.png", b"\x89PNG stored", "image/png")
    assert location == f"s3://outputs/jobs/signed-{public}/0.png"
    assert url.startswith(f"{endpoint}/outputs/jobs/signed-{public}/0.png?") and "Signature=" in url
    assert urllib.request.urlopen(url, timeout=10).read() == b"\x89PNG stored"

