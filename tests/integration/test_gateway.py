"""The gateway in front of two real Triton instances, driven by the official clients.

Every served answer is checked against ground truth (a direct torch forward pass on held-out
real data), and against Triton answering directly.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException
from prometheus_client.parser import text_string_to_metric_families

import fleet
from conftest import REPO_ROOT, Stack, gateway_config, running_gateway
from gateway.client import GatewayClient, GatewayClientError
from served_models import ATOL, BREAST_CANCER, DIGITS, MAX_BATCH, MODELS, ServedModel, torch_reference

pytestmark = pytest.mark.integration

GATEWAY_PORT = 8180
BODY_LIMIT = 1 << 20
READ_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def stack(fleet_module_factory: Callable[..., fleet.Fleet], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    triton = fleet_module_factory(2, 8170)
    config = gateway_config(triton.http_urls, GATEWAY_PORT, server={"max_body_bytes": BODY_LIMIT, "read_timeout_s": READ_TIMEOUT})
    with running_gateway(config, GATEWAY_PORT, tmp_path_factory.mktemp("gateway")) as gw:
        yield Stack(triton, gw)


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(stack.gateway.hostport, concurrency=8)
    yield c
    c.close()


def infer_input(name: str, rows: np.ndarray, binary: bool) -> httpclient.InferInput:
    inp = httpclient.InferInput(name, list(rows.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(rows, dtype=np.float32), binary_data=binary)
    return inp


def infer_all(
    client: httpclient.InferenceServerClient, model: ServedModel, x: np.ndarray, binary: bool, version: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "probabilities")]
    logits, probs = [], []
    for start in range(0, len(x), MAX_BATCH):
        result = client.infer(
            model.name, [infer_input(model.input_name, x[start : start + MAX_BATCH], binary)], outputs=outputs, model_version=version
        )
        logits.append(result.as_numpy("logits"))
        probs.append(result.as_numpy("probabilities"))
    return np.concatenate(logits), np.concatenate(probs)


# --- protocol surface -------------------------------------------------------------------------


def test_health_and_metadata_answer_like_triton(stack: Stack, client: httpclient.InferenceServerClient) -> None:
    direct = httpclient.InferenceServerClient(stack.triton.http_urls[0].removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        extensions = client.get_server_metadata()["extensions"]
        assert "binary_tensor_data" in extensions and "classification" in extensions
        for model in MODELS:
            assert client.is_model_ready(model.name)
            assert client.is_model_ready(model.name, "1")
            assert client.get_model_metadata(model.name) == direct.get_model_metadata(model.name)
            assert client.get_model_config(model.name) == direct.get_model_config(model.name)
            assert client.get_model_metadata(model.name, "1")["versions"] == ["1"]
        assert not client.is_model_ready("no_such_model")
    finally:
        direct.close()


def test_the_repository_index_is_the_fleets_and_model_control_is_refused(
    stack: Stack, client: httpclient.InferenceServerClient
) -> None:
    direct = httpclient.InferenceServerClient(stack.triton.http_urls[0].removeprefix("http://"))
    try:
        ready_on_triton = [e for e in direct.get_model_repository_index() if e.get("state") == "READY"]
    finally:
        direct.close()
    index = client.get_model_repository_index()
    assert index == sorted(ready_on_triton, key=lambda e: (e["name"], int(e["version"])))
    assert {(e["name"], e["version"]) for e in index} == {(m.name, "1") for m in MODELS}
    with httpx.Client(base_url=stack.gateway.url, timeout=10) as http:
        assert http.post("/v2/repository/index", json={"ready": True}).json() == index
        bad = http.post("/v2/repository/index", json={"ready": "yes"})
        assert bad.status_code == 400 and "ready" in bad.json()["error"]
        # Compressed as tritonclient compresses request bodies, as on the infer route.
        packed = gzip.compress(b'{"ready": true}')
        assert http.post("/v2/repository/index", content=packed, headers={"Content-Encoding": "gzip"}).json() == index
        brotli = http.post("/v2/repository/index", content=packed, headers={"Content-Encoding": "br"})
        assert brotli.status_code == 415 and "Content-Encoding" in brotli.json()["error"]
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as err:
            call(DIGITS.name)
        assert err.value.status() == "400" and "through the gateway is not supported" in err.value.message()
    assert client.is_model_ready(DIGITS.name)  # still served


# --- right answers ----------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_outputs_match_torch_and_reach_target_accuracy(
    client: httpclient.InferenceServerClient, model: ServedModel, binary: bool
) -> None:
    splits = model.splits()
    logits, probs = infer_all(client, model, splits.x_test, binary)
    ref_logits, ref_probs = torch_reference(model.name, splits.x_test)
    np.testing.assert_allclose(logits, ref_logits, atol=ATOL, rtol=0)
    np.testing.assert_allclose(probs, ref_probs, atol=ATOL, rtol=0)
    assert float((logits.argmax(axis=1) == splits.y_test).mean()) >= model.target_accuracy


def test_gateway_answers_equal_direct_triton_answers(stack: Stack, client: httpclient.InferenceServerClient) -> None:
    direct = httpclient.InferenceServerClient(stack.triton.http_urls[1].removeprefix("http://"))
    try:
        x = DIGITS.splits().x_test[:MAX_BATCH]
        via_gateway = infer_all(client, DIGITS, x, binary=True, version="1")
        via_triton = infer_all(direct, DIGITS, x, binary=True, version="1")
    finally:
        direct.close()
    for a, b in zip(via_gateway, via_triton):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_gives_the_top_classes_of_the_torch_forward_with_their_labels(
    stack: Stack, client: httpclient.InferenceServerClient, binary: bool
) -> None:
    """tritonclient's class_count (the classification extension): Triton ranks the output,
    naming each class from the model's labels.txt; the gateway asks for it and passes it on."""
    splits = BREAST_CANCER.splits()
    x = splits.x_test[:MAX_BATCH]
    labels = (REPO_ROOT / "model_repository" / BREAST_CANCER.name / "labels.txt").read_text().split()
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=2)]
    outputs.append(httpclient.InferRequestedOutput("logits", binary_data=binary))
    answer = client.infer(BREAST_CANCER.name, [infer_input("features", x, binary)], outputs=outputs)
    ranked, logits = answer.as_numpy("probabilities"), answer.as_numpy("logits")
    ref_logits, ref_probs = torch_reference(BREAST_CANCER.name, x)
    assert ranked.shape == (len(x), 2) and ranked.dtype == object
    np.testing.assert_allclose(logits, ref_logits, atol=ATOL, rtol=0)
    text = [[item.decode() if isinstance(item, bytes) else item for item in row] for row in ranked.tolist()]
    for row, ref in zip(text, ref_probs):
        fields = [item.split(":") for item in row]
        indices = [int(index) for _, index, _ in fields]
        assert indices == list(np.argsort(-ref, kind="stable")), (row, ref)
        assert [label for _, _, label in fields] == [labels[i] for i in indices]
        np.testing.assert_allclose([float(value) for value, _, _ in fields], ref[indices], atol=1e-5, rtol=0)
    top = np.array([int(row[0].split(":")[1]) for row in text])
    assert float((top == splits.y_test[:MAX_BATCH]).mean()) >= BREAST_CANCER.target_accuracy
    # Triton's own answer, string for string.
    direct = httpclient.InferenceServerClient(stack.triton.http_urls[0].removeprefix("http://"))
    try:
        expected = direct.infer(BREAST_CANCER.name, [infer_input("features", x, binary)], outputs=outputs[:1])
    finally:
        direct.close()
    assert ranked.tolist() == expected.as_numpy("probabilities").tolist()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_from_tritonclient(client: httpclient.InferenceServerClient, algorithm: str) -> None:
    x = BREAST_CANCER.splits().x_test[:8]
    result = client.infer(
        BREAST_CANCER.name, [infer_input("features", x, binary=True)], request_compression_algorithm=algorithm,
        parameters={"note": "a custom parameter makes the request travel alone, parameters included"},
    )  # fmt: skip
    np.testing.assert_allclose(result.as_numpy("probabilities"), torch_reference(BREAST_CANCER.name, x)[1], atol=ATOL, rtol=0)


def test_batched_rows_equal_rows_sent_one_by_one(client: httpclient.InferenceServerClient) -> None:
    x = BREAST_CANCER.splits().x_test[:40]
    batched, _ = infer_all(client, BREAST_CANCER, x, binary=True)
    single = np.concatenate([infer_all(client, BREAST_CANCER, x[i : i + 1], binary=True)[0] for i in range(len(x))])
    np.testing.assert_allclose(batched, single, atol=ATOL, rtol=0)


def fleet_requests(stats: dict, model: str) -> int:
    """Inference requests Triton executed for ``model``, summed over the fleet by the gateway."""
    return sum(int(s["inference_stats"]["success"]["count"]) for s in stats["model_stats"] if s["name"] == model)


async def test_concurrent_clients_are_batched_and_each_gets_its_own_rows(stack: Stack) -> None:
    model = DIGITS
    x = model.splits().x_test[:240]
    sizes = [1, 2, 3, 4] * 24  # 240 rows in 96 requests
    bounds = np.cumsum([0, *sizes])
    _, ref_probs = torch_reference(model.name, x)
    client = aiohttpclient.InferenceServerClient(stack.gateway.hostport, conn_limit=96)
    try:
        before = fleet_requests(await client.get_inference_statistics(model.name), model.name)

        async def one(a: int, b: int) -> np.ndarray:
            out = [aiohttpclient.InferRequestedOutput("probabilities", binary_data=True)]
            inp = aiohttpclient.InferInput(model.input_name, [int(b - a), 1, 8, 8], "FP32")
            inp.set_data_from_numpy(x[a:b], binary_data=True)
            result = await client.infer(model.name, [inp], outputs=out)
            assert [o["name"] for o in result.get_response()["outputs"]] == ["probabilities"]
            return result.as_numpy("probabilities")

        results = await asyncio.gather(*(one(a, b) for a, b in zip(bounds[:-1], bounds[1:])))
        after = fleet_requests(await client.get_inference_statistics(model.name), model.name)
    finally:
        await client.close()
    for (a, b), probs in zip(zip(bounds[:-1], bounds[1:]), results):
        np.testing.assert_allclose(probs, ref_probs[a:b], atol=ATOL, rtol=0)
    upstream = after - before
    assert 0 < upstream < len(sizes), f"{len(sizes)} client requests became {upstream} upstream requests"


async def test_msgpack_client_round_trip(stack: Stack) -> None:
    x = DIGITS.splits().x_test[:10].astype(np.float32)
    ref_logits, ref_probs = torch_reference(DIGITS.name, x)
    async with GatewayClient(stack.gateway.url) as gw:
        result = await gw.infer(DIGITS.name, {"image": x})
        assert result.model_version == "1"
        np.testing.assert_allclose(result.outputs["logits"], ref_logits, atol=ATOL, rtol=0)
        np.testing.assert_allclose(result.outputs["probabilities"], ref_probs, atol=ATOL, rtol=0)
        only = await gw.infer(DIGITS.name, {"image": x}, outputs=["probabilities"], version="1", request_id="r-7")
        assert list(only.outputs) == ["probabilities"] and only.id == "r-7"
        with pytest.raises(GatewayClientError) as err:
            await gw.infer(DIGITS.name, {"image": x.astype(np.float64)})
        assert err.value.status == 400 and "image" in str(err.value)


# --- errors -----------------------------------------------------------------------------------


def v2_json(name: str = "features", datatype: str = "FP32", shape: tuple[int, ...] = (1, 30)) -> dict:
    n = int(np.prod(shape))
    return {"inputs": [{"name": name, "datatype": datatype, "shape": list(shape), "data": [0.5] * n}]}


BINARY_HEADER = b'{"inputs":[{"name":"features","datatype":"FP32","shape":[1,30],"parameters":{"binary_data_size":120}}]}'

ERROR_CASES = [
    ("unknown model", "POST", "/v2/models/nope/infer", {"json": v2_json()}, 404, "nope"),
    ("unknown model metadata", "GET", "/v2/models/nope", {}, 404, "nope"),
    ("unknown version", "POST", "/v2/models/breast_cancer_mlp/versions/7/infer", {"json": v2_json()}, 404, "7"),
    ("unknown version config", "GET", "/v2/models/breast_cancer_mlp/versions/7/config", {}, 404, "7"),
    ("non-numeric version", "GET", "/v2/models/breast_cancer_mlp/versions/latest", {}, 400, "latest"),
    ("wrong input name", "POST", "/v2/models/breast_cancer_mlp/infer", {"json": v2_json(name="feat")}, 400, "feat"),
    ("wrong datatype", "POST", "/v2/models/breast_cancer_mlp/infer", {"json": v2_json(datatype="FP64")}, 400, "features"),
    ("wrong shape", "POST", "/v2/models/breast_cancer_mlp/infer", {"json": v2_json(shape=(1, 29))}, 400, "features"),
    ("batch too large", "POST", "/v2/models/breast_cancer_mlp/infer", {"json": v2_json(shape=(65, 30))}, 400, "batch size"),
    ("malformed json", "POST", "/v2/models/breast_cancer_mlp/infer", {"content": b'{"inputs": ['}, 400, "JSON"),
    # Triton looks the model up before it reads the body: an unknown one is a 404 whatever is sent.
    ("malformed json to an unknown model", "POST", "/v2/models/nope/infer", {"content": b'{"inputs": ['}, 404, "'nope'"),
    ("malformed json to an unknown version", "POST", "/v2/models/breast_cancer_mlp/versions/7/infer", {"content": b"{"}, 404, "7"),
    (
        "malformed msgpack to an unknown model",
        "POST",
        "/v2/models/nope/infer",
        {"content": b"\xc1\xff", "headers": {"Content-Type": "application/msgpack"}},
        404,
        "'nope'",
    ),
    (
        "malformed msgpack",
        "POST",
        "/v2/models/breast_cancer_mlp/infer",
        {"content": b"\xc1\xff", "headers": {"Content-Type": "application/msgpack"}},
        400,
        "msgpack",
    ),
    (
        "binary header past the body",
        "POST",
        "/v2/models/breast_cancer_mlp/infer",
        {"content": b'{"inputs": []}', "headers": {"Inference-Header-Content-Length": "9999"}},
        400,
        "Inference-Header-Content-Length",
    ),
    (
        "binary header not a number",
        "POST",
        "/v2/models/breast_cancer_mlp/infer",
        {"content": b'{"inputs": []}', "headers": {"Inference-Header-Content-Length": "ten"}},
        400,
        "Inference-Header-Content-Length",
    ),
    (
        "binary size mismatch",
        "POST",
        "/v2/models/breast_cancer_mlp/infer",
        {"content": BINARY_HEADER + b"\x00" * 7, "headers": {"Inference-Header-Content-Length": str(len(BINARY_HEADER))}},
        400,
        "features",
    ),
    ("body over the limit", "POST", "/v2/models/breast_cancer_mlp/infer", {"content": b" " * (BODY_LIMIT + 1)}, 413, "limit"),
    # Triton answers these parameters with a 500, which the gateway would hold against the instance.
    (
        "priority not a number",
        "POST",
        "/v2/models/breast_cancer_mlp/infer",
        {"json": {**v2_json(), "parameters": {"priority": "high"}}},
        400,
        "request parameter 'priority' must be an unsigned integer",
    ),
    (
        "classification not a number",
        "POST",
        "/v2/models/breast_cancer_mlp/infer",
        {"json": {**v2_json(), "outputs": [{"name": "probabilities", "parameters": {"classification": "2"}}]}},
        400,
        "requested output 'probabilities': classification must be an unsigned 32-bit integer",
    ),
    (
        "sequence_start not a boolean",
        "POST",
        "/v2/models/breast_cancer_mlp/infer",
        {"json": {**v2_json(), "parameters": {"sequence_start": "x"}}},
        400,
        "request parameter 'sequence_start' must be true or false",
    ),
    ("non-numeric version stats", "GET", "/v2/models/breast_cancer_mlp/versions/abc/stats", {}, 400, '"abc"'),
    ("stats of an unknown model", "GET", "/v2/models/nope/stats", {}, 404, "'nope'"),
    ("stats of an unknown version", "GET", "/v2/models/breast_cancer_mlp/versions/9/stats", {}, 404, "not available"),
    ("metadata of an unknown model", "GET", "/v2/models/nope", {}, 404, "'nope'"),
    ("model name too long", "GET", "/v2/models/" + "a" * 9000 + "/config", {}, 400, "longer than 255 bytes"),
    ("model name too long infer", "POST", "/v2/models/" + "a" * 9000 + "/infer", {"json": v2_json()}, 400, "longer than 255 bytes"),
    ("readiness of an unknown model", "GET", "/v2/models/nope/ready", {}, 400, "model 'nope' is not ready"),
    ("unknown route", "GET", "/v2/nothing/here", {}, 404, "no such endpoint: GET /v2/nothing/here"),
    # An encoded "/" is part of a name, as on Triton: not a way to another route.
    ("an encoded slash in an infer path", "POST", "/v2/models/breast_cancer_mlp%2Finfer", {"json": v2_json()}, 404, "no such endpoint"),
    ("an encoded slash in a metadata path", "GET", "/v2/models/breast_cancer_mlp%2fversions%2F1", {}, 404, "encoded '/'"),
    ("a trailing slash is no other name", "POST", "/v2/repository/index/", {}, 404, "no such endpoint: POST /v2/repository/index/"),
    ("wrong method on a route", "DELETE", "/v2/health/ready", {}, 405, "method DELETE is not allowed on /v2/health/ready: use GET, HEAD"),
    ("GET on infer", "GET", "/v2/models/breast_cancer_mlp/infer", {}, 405, "method GET is not allowed on /v2/models/breast_cancer_mlp/infer: use POST"),
    ("PUT on a version's infer", "PUT", "/v2/models/breast_cancer_mlp/versions/1/infer", {"json": v2_json()}, 405, "POST"),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_requests_get_a_clear_4xx_and_the_connection_survives(stack: Stack, case: tuple) -> None:
    _, method, path, kwargs, status, fragment = case
    with httpx.Client(base_url=stack.gateway.url, timeout=10) as http:
        resp = http.request(method, path, **kwargs)
        assert resp.status_code == status, resp.text
        if "msgpack" in kwargs.get("headers", {}).get("Content-Type", ""):
            message = msgpack.unpackb(resp.content)["error"]
        else:
            message = resp.json()["error"]
        assert fragment in message
        # The same connection still serves a good request afterwards.
        ok = http.post("/v2/models/breast_cancer_mlp/infer", json=v2_json())
        assert ok.status_code == 200 and ok.json()["model_version"] == "1"


@pytest.mark.parametrize("small", [True, False], ids=["held by the protocol", "ASGI"])
def test_a_request_whose_body_stops_arriving_is_408_and_the_gateway_serves_on(stack: Stack, small: bool) -> None:
    body = json.dumps(v2_json()).encode()
    declared = len(body) if small else BODY_LIMIT  # a large body is read through ASGI
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", GATEWAY_PORT), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/breast_cancer_mlp/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (declared, body[: len(body) // 2])
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert READ_TIMEOUT - 0.5 < time.monotonic() - started < READ_TIMEOUT + 3
    assert answer.startswith(b"HTTP/1.1 408") and b"nothing came for 2 s" in answer
    with httpx.Client(base_url=stack.gateway.url, timeout=10) as http:
        assert http.post("/v2/models/breast_cancer_mlp/infer", json=v2_json()).status_code == 200


def test_a_request_head_over_the_limit_is_431_and_the_gateway_serves_on(stack: Stack) -> None:
    with socket.create_connection(("127.0.0.1", GATEWAY_PORT), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/breast_cancer_mlp/infer HTTP/1.1\r\nhost: x\r\nx-padding: %s\r\n"
            b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}" % (b"a" * 70_000)
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 431") and b"limit of 65536 bytes" in answer
    with httpx.Client(base_url=stack.gateway.url, timeout=10) as http:
        assert http.post("/v2/models/breast_cancer_mlp/infer", json=v2_json()).status_code == 200


def test_bad_parameters_from_a_client_never_count_against_an_instance(stack: Stack) -> None:
    with httpx.Client(base_url=stack.gateway.url, timeout=10) as http:
        for bad in ({"priority": "high"}, {"sequence_id": -1}, {"sequence_end": 1}) * 4:
            resp = http.post("/v2/models/breast_cancer_mlp/infer", json={**v2_json(), "parameters": bad})
            assert resp.status_code == 400, resp.text
        instances = http.get("/v2/gateway/fleet").json()["instances"]
    assert len(instances) == 2
    assert all(i["state"] == "up" and i["consecutive_failures"] == 0 for i in instances), instances


def test_a_version_is_read_as_a_number_as_triton_reads_it(stack: Stack) -> None:
    """"01" and "1" are one version: one answer, one metrics series."""
    model = BREAST_CANCER.name
    rows = BREAST_CANCER.splits().x_test[:1]
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": rows.ravel().tolist()}]}
    with httpx.Client(base_url=stack.gateway.url, timeout=10) as http:
        for spelling in ("01", "0001"):
            resp = http.post(f"/v2/models/{model}/versions/{spelling}/infer", json=body)
            assert resp.status_code == 200 and resp.json()["model_version"] == "1", resp.text
            probs = next(o for o in resp.json()["outputs"] if o["name"] == "probabilities")["data"]
            np.testing.assert_allclose(np.array(probs, np.float32).reshape(1, 2), torch_reference(model, rows)[1], atol=ATOL, rtol=0)
            assert http.get(f"/v2/models/{model}/versions/{spelling}/ready").status_code == 200
            unknown = http.get(f"/v2/models/{model}/versions/9{spelling}/ready")  # Triton's 400, with words
            assert unknown.status_code == 400 and unknown.json()["error"] == f"model '{model}' version {int('9' + spelling)} is not ready: no instance can serve it"
            assert http.get(f"/v2/models/{model}/versions/{spelling}").json()["name"] == model
        versions = {dict(labels).get("version") for name, labels in scrape(http) if dict(labels).get("model") == model}
    assert "1" in versions and not versions & {"01", "0001"}, versions


# --- metrics ----------------------------------------------------------------------------------


def scrape(http: httpx.Client) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    resp = http.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain"), resp.text
    return {
        (s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(resp.text) for s in family.samples
    }


def test_metrics_count_answers_by_code_rows_batched_and_every_instance(stack: Stack) -> None:
    model = BREAST_CANCER.name
    x = BREAST_CANCER.splits().x_test[:12]
    sizes = (1, 2, 3, 6)  # the 12 rows in 4 requests
    with httpx.Client(base_url=stack.gateway.url, timeout=10) as http:
        before = scrape(http)
        start = 0
        for n in sizes:
            rows = x[start : start + n]
            start += n
            body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [n, 30], "data": rows.ravel().tolist()}]}
            resp = http.post(f"/v2/models/{model}/infer", json=body)
            assert resp.status_code == 200, resp.text
            probs = next(o for o in resp.json()["outputs"] if o["name"] == "probabilities")["data"]
            np.testing.assert_allclose(np.array(probs, np.float32).reshape(n, 2), torch_reference(model, rows)[1], atol=ATOL, rtol=0)
        assert http.post(f"/v2/models/{model}/infer", json=v2_json(name="feat")).status_code == 400
        assert http.post("/v2/models/nope/infer", json=v2_json()).status_code == 404
        after = scrape(http)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    counted = {
        tuple(sorted(labels)): after[(name, labels)] - before.get((name, labels), 0.0)
        for name, labels in after
        if name == "gateway_infer_requests_total" and after[(name, labels)] != before.get((name, labels), 0.0)
    }
    assert counted == {
        (("code", "200"), ("model", model), ("version", "1")): 4,
        (("code", "400"), ("model", model), ("version", "1")): 1,  # the version chosen before the check failed
        (("code", "404"), ("model", ""), ("version", "")): 1,  # a name the fleet does not serve
    }
    assert delta("gateway_infer_request_duration_seconds_count", model=model) == 5
    assert delta("gateway_infer_request_duration_seconds_bucket", model=model, le="+Inf") == 5
    assert delta("gateway_batcher_rows_sent_total", model=model, version="1") == sum(sizes)
    assert delta("gateway_batcher_batches_sent_total", model=model, version="1") == len(sizes)  # one client: no one to batch with
    urls = stack.triton.http_urls
    assert {after[("gateway_instance_up", frozenset({("upstream", u)}))] for u in urls} == {1.0}
    assert sum(delta("gateway_instance_requests_total", upstream=u) for u in urls) == len(sizes)
    assert {labels for name, labels in after if name == "gateway_instance_up"} == {frozenset({("upstream", u)}) for u in urls}
    # One request at a time: the batcher never held (no company), whatever the host's load, which
    # the gateway reads from /proc/stat (its first half second past long before this scrape).
    assert after[("gateway_batcher_holding", frozenset({("model", model), ("version", "1")}))] == 0
    assert 0 <= after[("gateway_host_cpu_busy_ratio", frozenset())] <= 1


def test_unreachable_upstream_is_503(tmp_path: Path) -> None:
    config = gateway_config(["http://127.0.0.1:8199"], GATEWAY_PORT + 1, upstream={"health_interval_s": 0.2})
    with running_gateway(config, GATEWAY_PORT + 1, tmp_path) as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        assert http.get("/v2/health/live").status_code == 200
        assert http.get("/v2/health/ready").status_code == 503
        resp = http.post("/v2/models/breast_cancer_mlp/infer", json=v2_json())
        assert resp.status_code == 503 and "instance" in resp.json()["error"]
        assert "8199" not in resp.json()["error"]  # no internal address reaches a client
        assert http.get("/v2/models/breast_cancer_mlp").status_code == 503


def test_worker_processes_share_the_port_and_stop_together(stack: Stack, tmp_path: Path) -> None:
    config = gateway_config(stack.triton.http_urls, GATEWAY_PORT + 2, server={"workers": 2})
    with running_gateway(config, GATEWAY_PORT + 2, tmp_path) as gw:
        workers = gw.worker_pids()
        assert len(workers) == 2, workers
        with httpx.Client(base_url=gw.url, timeout=10) as http:
            x = BREAST_CANCER.splits().x_test[:3]
            body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [3, 30], "data": x.ravel().tolist()}]}
            for _ in range(10):
                resp = http.post(f"/v2/models/{BREAST_CANCER.name}/infer", json=body)
                assert resp.status_code == 200, resp.text
                probs = np.array(resp.json()["outputs"][1]["data"], np.float32).reshape(3, 2)
                np.testing.assert_allclose(probs, torch_reference(BREAST_CANCER.name, x)[1], atol=ATOL, rtol=0)
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


# --- perf_analyzer ----------------------------------------------------------------------------


def test_perf_analyzer_runs_against_the_gateway(stack: Stack, tmp_path: Path) -> None:
    report = tmp_path / "pa.csv"
    proc = subprocess.run(
        [
            str(REPO_ROOT / "triton" / "perf_analyzer" / "perf_analyzer.sh"),
            "-m", DIGITS.name, "-u", stack.gateway.hostport, "-i", "http",
            # The point is that perf_analyzer works through the gateway and reports throughput,
            # not a stable figure: on a shared 2-core machine windows can differ by half.
            "--concurrency-range", "4", "--measurement-interval", "1000", "--max-trials", "10",
            "--stability-percentage", "100", "-f", str(report),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if proc.returncode != 0:
        stats = httpx.get(f"{stack.gateway.url}/v2/models/{DIGITS.name}/stats", timeout=10)
        pytest.fail(
            f"perf_analyzer failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}\n"
            f"gateway stats now: {stats.status_code} {stats.text[:2000]}\ngateway log:\n{stack.gateway.log()[-4000:]}"
        )
    with report.open() as f:
        rows = list(csv.DictReader(f))
    assert rows and float(rows[0]["Inferences/Second"]) > 50, rows
