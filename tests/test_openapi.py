"""Property-based tests through the real server: no 5xx, nothing queued when rejected, and
every answer documented (status and body type) in the served OpenAPI description.

schemathesis generates requests from the served OpenAPI description (valid and invalid
ones); hypothesis generates hostile legacy queries and JSON bodies. Both run against
``python server.py`` (Hypercorn) with a queue prefix of their own, and no worker, so the
work queue's depth counts exactly what the server accepted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from broker import Names
from tests.conftest import ROOT, TEST_RETRY_DELAYS, delete_topology
from tests.support import AMQP_URL, free_port, queue_depth

pytestmark = pytest.mark.timeout(240)


@dataclass(frozen=True)
class RunningServer:
    base_url: str
    prefix: str

    def depth(self) -> int:
        return asyncio.run(queue_depth(Names.for_prefix(self.prefix).send_queue))


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("openapi")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    port = free_port()
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "AMQP_URL": AMQP_URL,
        "QUEUE_PREFIX": prefix,
        "PORT": str(port),
        "DATABASE_URL": f"sqlite:///{tmp}/mailroom.db",
        "TALKTOME_LOG": str(tmp / "talk.log"),
        "RETRY_DELAYS": ",".join(str(d) for d in TEST_RETRY_DELAYS),
        "LOG_LEVEL": "WARNING",
    }
    log_file = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "server.py")],
        cwd=tmp,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp / "server.log").read_text()
            try:
                if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready within 20s"
            time.sleep(0.1)
        yield RunningServer(base_url, prefix)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log_file.close()
        asyncio.run(delete_topology(Names.for_prefix(prefix, TEST_RETRY_DELAYS)))
    output = (tmp / "server.log").read_text()
    assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def api_schema(api_server: RunningServer) -> Any:
    schema = schemathesis.openapi.from_url(f"{api_server.base_url}/openapi.json")
    schema.config.update(base_url=api_server.base_url)
    return schema


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_never_5xx(
    mode: GenerationMode, api_schema: Any, api_server: RunningServer
) -> None:
    """Every operation of the served description, with schemathesis-generated requests."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/", "/api/messages", "/api/messages/batch", "/logs"}
    tested = []
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis_settings(
            max_examples=30, deadline=None, suppress_health_check=list(HealthCheck)
        )
        def check(case: Any) -> None:
            before = api_server.depth()
            response = case.call(base_url=api_server.base_url, timeout=10)
            assert response.status_code < 500, (case.method, case.path, response.text)
            # Whatever it answers is in its description, with the body type it sends.
            responses = case.operation.definition.raw["responses"]
            documented = responses.get(str(response.status_code))
            assert documented is not None, (case.method, case.path, response.status_code)
            if response.status_code == 204 or (
                # h11's own answer to a malformed header (an empty Content-Length on a
                # DELETE): no body, before the app sees the request.
                response.status_code == 400 and not response.content
            ):
                assert not response.content
            else:
                media = response.headers.get("content-type", [""])[0].split(";")[0]
                assert media in documented["content"], (case.method, case.path, media)
            after = api_server.depth()
            if response.status_code >= 400:
                assert after == before, f"rejected with {response.status_code} but queued"
            if case.path == "/api/messages/batch" and response.status_code == 200:
                assert after - before == response.json()["queued"]
            else:
                assert after - before <= 1

        try:
            check()
        except Unsatisfiable:
            # Nothing to get wrong (no parameters, no body): no invalid request exists.
            assert mode is GenerationMode.NEGATIVE
            continue
        tested.append(f"{operation.method.upper()} {operation.path}")
    assert {
        "POST /api/messages",
        "POST /api/messages/batch",
        "GET /api/messages",
        "GET /logs",
        "PUT /api/templates/{name}",
        "GET /api/templates/{name}",
    } <= set(tested)


# Text that tries to break out of an address or a header.
hostile_text = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.sampled_from("a@.<>\"'\r\n\0 ,;:?=&%+-_\\ßü€"), max_size=80),
    st.builds(
        lambda local, tail: f"{local}@example.com{tail}",
        st.text(max_size=20),
        st.sampled_from(["", "\r\nBcc: x@example.com", "?subject=x", "\0", ",b@example.com"]),
    ),
)


@given(value=hostile_text)
@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_legacy_sendmail_hostile_values(value: str, api_server: RunningServer) -> None:
    before = api_server.depth()
    response = httpx.get(f"{api_server.base_url}/", params={"sendmail": value}, timeout=10)
    assert response.status_code < 500
    after = api_server.depth()
    if response.status_code == 200:
        assert after == before + 1
        assert "\r" not in value and "\n" not in value and "\0" not in value
    else:
        assert 400 <= response.status_code < 500 and after == before


base64s = st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | hostile_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)
message_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "to": st.one_of(hostile_text, st.lists(hostile_text, max_size=3)),
            "subject": hostile_text,
        },
        optional={
            "text": hostile_text,
            "html": json_values,
            "reply_to": hostile_text,
            "cc": st.one_of(hostile_text, st.lists(hostile_text, max_size=3)),
            "bcc": st.one_of(hostile_text, st.lists(hostile_text, max_size=3)),
            "from": hostile_text,
            "headers": st.one_of(
                json_values, st.dictionaries(hostile_text, hostile_text, max_size=3)
            ),
            "attachments": st.one_of(
                json_values,
                st.lists(
                    st.fixed_dictionaries(
                        {"filename": hostile_text, "content": st.one_of(hostile_text, base64s)},
                        optional={"content_type": hostile_text, "content_id": hostile_text},
                    ),
                    max_size=3,
                ),
            ),
            "tags": st.one_of(json_values, st.lists(hostile_text, max_size=3)),
            "metadata": st.one_of(
                json_values, st.dictionaries(hostile_text, hostile_text, max_size=3)
            ),
            "template": st.one_of(hostile_text, st.just("welcome")),
            "variables": json_values,
        },
    ),
)


@given(body=message_bodies)
@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_json_api_hostile_bodies(body: Any, api_server: RunningServer) -> None:
    welcome = {"subject": "Hi {{ name }}", "text": "{{ name }}", "html": "<p>{{ name }}</p>"}
    httpx.put(f"{api_server.base_url}/api/templates/welcome", json=welcome, timeout=10)
    before = api_server.depth()
    response = httpx.post(
        f"{api_server.base_url}/api/messages",
        content=json.dumps(body),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code < 500, response.text
    after = api_server.depth()
    if response.status_code == 202:
        assert after == before + 1
    else:
        assert 400 <= response.status_code < 500 and after == before
        assert response.json()["error"]


@given(raw=st.binary(max_size=200))
@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_json_api_garbage_bytes(raw: bytes, api_server: RunningServer) -> None:
    before = api_server.depth()
    response = httpx.post(
        f"{api_server.base_url}/api/messages",
        content=raw,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code < 500, response.text
    if response.status_code != 202:
        assert api_server.depth() == before
