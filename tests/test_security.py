"""Security: internal addresses stay unreachable, redirects are not followed, Redis with a password works end to
end with its password nowhere in what the service writes."""

from __future__ import annotations

import ipaddress
import socket
import threading

import pytest

from tests.support import box_mask, photo, upload
from worker.errors import InputForbidden
from worker.https_fetch import public_addresses
from worker.settings import Settings
from worker.storage import StorageFetcher


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "169.254.169.254", "10.1.2.3", "192.168.0.1",
                                  "172.16.5.4", "::1", "0.0.0.0"])
def test_internal_addresses_are_refused_even_for_allowed_hosts(host):
    with pytest.raises(InputForbidden) as caught:
        public_addresses(host, "image")
    assert "internal address" in caught.value.message


@pytest.mark.parametrize(("host", "carried"), [
    ("64:ff9b::a00:5", "10.0.0.5"),  # NAT64 (RFC 6052): a gateway takes it to 10.0.0.5
    ("64:ff9b:1::a9fe:a9fe", "169.254.169.254"),  # local-use NAT64 (RFC 8215): cloud metadata
    ("2002:a00:5::1", "10.0.0.5"),  # 6to4
    ("2001:0:4136:e378:8000:63bf:f5ff:fffa", "10.0.0.5"),  # Teredo: the client's address, obfuscated
    ("::ffff:127.0.0.1", "127.0.0.1"),  # IPv4-mapped
])
def test_an_ipv6_address_carrying_an_internal_ipv4_address_is_refused(host, carried):
    with pytest.raises(InputForbidden) as caught:
        public_addresses(host, "image")
    assert "internal address" in caught.value.message  # NAT64 and 6to4 addresses count as global themselves
    assert carried in caught.value.message or not ipaddress.ip_address(host).is_global


def test_an_ipv6_address_carrying_a_public_ipv4_address_is_allowed():
    assert public_addresses("64:ff9b::808:808", "image") == ["64:ff9b::808:808"]  # NAT64 to 8.8.8.8


def test_an_allowed_name_that_resolves_inside_is_refused_before_any_request():
    fetcher = StorageFetcher(Settings(http_allow=["localhost"]), client=object())
    with pytest.raises(InputForbidden) as caught:
        fetcher.fetch("https://localhost/cat.png", "image")
    assert caught.value.field == "image" and "127.0.0.1" in caught.value.message


@pytest.mark.slow
def test_redis_with_a_password_works_end_to_end_and_the_password_stays_out(tiny_model_dir, tmp_path, worker_env):
    from worker.app import make_app
    from worker.client import InpaintClient
    from worker.stack import LocalStack

    password = "redis-pass-7f3e9c"
    stack = LocalStack(tmp_path, model=str(tiny_model_dir), redis_password=password).start()
    try:
        client = InpaintClient(make_app(stack.settings()))
        worker = stack.start_worker(f"secure@{socket.gethostname()}", INPAINT_LOG_FORMAT="json", **worker_env)
        worker.wait_ready(client.app)
        job_id = client.submit({"prompt": "a fig", "image": upload(stack, "s/p.png", photo()),
                                "mask_image": upload(stack, "s/m.png", box_mask()), "num_inference_steps": 2})
        status = client.wait(job_id, timeout=60)
        worker.stop()
        record = stack.s3.client().get_object(Bucket="outputs", Key=f"jobs/{job_id}/result.json")["Body"].read()
        state = client.app.backend.client.get(f"celery-task-meta-{job_id}")
        import redis

        with pytest.raises(redis.AuthenticationError):  # the server really requires it
            redis.Redis(host="127.0.0.1", port=stack.redis.port).ping()
    finally:
        stack.stop()
    assert status.state == "SUCCESS", status.error
    for text in (status.model_dump_json(), record.decode(), state.decode(), worker.log_path.read_text()):
        assert password not in text


@pytest.mark.slow
def test_an_s3_input_over_the_size_cap_is_refused(stack):
    from worker.errors import InvalidRequest

    ref = upload(stack, "big/photo.png", photo(128, 128))
    fetcher = StorageFetcher(stack.settings(input_max_bytes=1000), client=stack.s3.client())
    with pytest.raises(InvalidRequest) as caught:
        fetcher.fetch(ref, "image")
    assert caught.value.field == "image" and "cap" in caught.value.message
    assert len(StorageFetcher(stack.settings(), client=stack.s3.client()).fetch(ref, "image")) > 1000


def test_a_failed_https_input_is_reported_without_its_signature(monkeypatch):
    """A signed URL's query is its credential: errors (task state, logs, webhooks, Flower) show the URL without it."""
    from worker import https_fetch
    from worker.errors import StorageError

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    threading.Thread(target=lambda: listener.accept()[0].close(), daemon=True).start()  # no TLS: the fetch fails
    monkeypatch.setattr(https_fetch, "refuse_internal", lambda host, address, field: None)  # loopback only in tests
    fetcher = StorageFetcher(Settings(http_allow=["127.0.0.1"]), client=object())
    try:
        with pytest.raises(StorageError) as caught:
            fetcher.fetch(f"https://127.0.0.1:{port}/photo.png?X-Amz-Signature=SIGNATURE123&token=TOKEN456", "image")
    finally:
        listener.close()
    message = caught.value.message
    assert f"https://127.0.0.1:{port}/photo.png?..." in message
    assert "SIGNATURE123" not in message and "TOKEN456" not in message


def test_a_settings_error_does_not_echo_the_broker_password():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        Settings(broker_url="redis://:S3CRETPASS@127.0.0.1:9/0", step_cache=0.1, compile="on")
    assert "INPAINT_STEP_CACHE" in str(caught.value) and "S3CRETPASS" not in str(caught.value)


def test_what_is_recorded_of_a_request_holds_no_credentials_and_no_megabytes():
    from worker.redaction import redacted

    request = {"prompt": "a barn: http is not a URL here", "image": "data:image/png;base64," + "A" * 100_000,
               "mask_image": "https://user:pw@cdn.example.com/m.png?X-Amz-Signature=SIG#frag",
               "plugins": {"webhook": {"url": "https://hooks.example.com/cb?token=TOK", "secret": "SEC",
                                       "retries": 3}},
               "seed": [1, 2]}
    shown = redacted(request)
    assert shown["prompt"] == request["prompt"] and shown["seed"] == [1, 2]
    assert shown["image"] == "data:image/png;base64,... (100022 characters)"
    assert shown["mask_image"] == "https://cdn.example.com/m.png?..."
    assert shown["plugins"]["webhook"] == {"url": "https://hooks.example.com/cb?...", "secret": "<redacted>",
                                           "retries": 3}
    assert not any(secret in repr(shown) for secret in ("pw", "SIG", "TOK", "SEC"))
    socket_url = "redis+socket:///run/redis.sock?password=S3CRET&db=0"
    assert redacted(socket_url) == "redis+socket:///run/redis.sock?..."
    assert redacted("photo: a cat, http-free") == "photo: a cat, http-free"


def test_a_refused_request_quoting_a_signed_url_shows_it_without_its_query():
    from worker.errors import InvalidRequest
    from worker.schema import parse_request

    with pytest.raises(InvalidRequest) as caught:  # pydantic quotes the value it refused
        parse_request({"prompt": "x", "image": ["https://cdn.example/a.png?token=SECRET-TOKEN-42"],
                       "mask_image": "s3://inputs/mask.png"})
    assert caught.value.field == "image" and "https://cdn.example/a.png?..." in caught.value.message
    assert "SECRET-TOKEN-42" not in str(caught.value.to_dict())


def test_a_prompt_that_quotes_a_signed_url_is_recorded_whole_without_the_signature():
    from worker.redaction import redacted

    assert redacted({"prompt": "Style: https://cdn.example/ref.png?X-Amz-Signature=SECRET like this"}) == {
        "prompt": "Style: https://cdn.example/ref.png?... like this"}


def test_a_refused_value_is_quoted_with_its_secret_named_fields_hidden():
    from worker.errors import InvalidRequest
    from worker.schema import parse_request

    with pytest.raises(InvalidRequest) as caught:
        parse_request({"prompt": "x", "image": "s3://inputs/a.png", "mask_image": "s3://inputs/m.png",
                       "seed": {"api_key": "SEKRET-1"}})
    assert caught.value.field == "seed" and "'api_key': '<redacted>'" in caught.value.message
    assert "SEKRET" not in caught.value.message


def test_an_allowed_ipv6_host_may_be_written_with_or_without_brackets():
    assert Settings(http_allow=["[64:FF9B::A00:5]", "Images.Example.com"]).http_allow == ["64:ff9b::a00:5",
                                                                                         "images.example.com"]


@pytest.mark.parametrize("host", ["::ffff:0:10.0.0.5", "fec0::1"])  # SIIT's form of a private address; site-local
def test_other_ipv6_forms_of_internal_addresses_are_refused(host):
    with pytest.raises(InputForbidden):
        public_addresses(host, "image")
