"""A base classifier served elsewhere (smoothcert.remote) against a real Open Inference
Protocol v2 server: KServe's ModelServer on loopback (tests/remote_server.py), serving the
exact linear model. The remote path gives exactly the local model's certificates, passes the
exact-answer soundness check, refuses what it cannot count, and fails a job whose model
changes or whose server dies, without dropping or redrawing a sample."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("kserve")

from smoothcert.bundle import load_bundle
from smoothcert.certifier import Certifier
from smoothcert.endpoints import RemoteOptions, RemoteUnavailable, allowed, resolve
from smoothcert.manifest import BundleError
from smoothcert.remote import RemoteChanged, RemoteError
from tests.conftest import free_port
from tests.remote_server import RemoteServer
from tests.workers.helpers import make_bundle

from .exact import assert_rate_at_most, rate_is_too_high

SIGMA = 0.25


@pytest.fixture()
def server(kserve_server):
    return kserve_server


def remote_bundle(folder: Path, url: str, model: str = "tiny", **remote) -> Path:
    """A remote bundle: model.json alone, naming `model` at `url`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(json.dumps({
        "name": model, "kind": "remote", "input_shape": [1, 4, 4], "num_classes": 2, "labels": ["low", "high"],
        "sigma": {"default": SIGMA, "min": 0.05, "max": 1.0},
        "remote": {"endpoint": url, "model": model, "input": "x", "output": "output", "max_batch": 200, **remote},
    }))
    return folder


def remote_certifier(tmp_path: Path, url: str, model: str = "tiny", **remote) -> Certifier:
    bundle = load_bundle(remote_bundle(tmp_path / model, url, model, **remote), remote=RemoteOptions(allow=(url,)))
    return Certifier(bundle, device="cpu")


def point(mean_offset: float) -> np.ndarray:
    wiggle = np.random.default_rng(0).uniform(-0.2, 0.2, (1, 4, 4))
    return (0.5 + mean_offset + wiggle - wiggle.mean()).astype(np.float32)


def test_the_remote_path_gives_exactly_the_local_models_certificates(server, tmp_path):
    """Same seed, same noise, same function: the very same votes, bounds and radius as the
    model run in-process (tests/workers/helpers.py's linear bundle); the certificate names the
    endpoint, the model and the canaries' digest."""
    remote = remote_certifier(tmp_path, server.url)
    _, _, data = make_bundle(tmp_path / "local")
    local = Certifier(load_bundle(data), device="cpu")
    for k, offset in enumerate((0.3 / 4, -0.1 / 4, 0.02 / 4)):
        kw = dict(sigma=SIGMA, n0=50, n=3000, alpha=0.001, seed=k, batch_size=200)
        a, b = remote.certify(point(offset), **kw), local.certify(point(offset), **kw)
        assert (a.prediction, a.radius, a.n_a, a.p_a_lower) == (b.prediction, b.radius, b.n_a, b.p_a_lower)
    assert a.remote.endpoint == server.url and a.remote.model == "tiny" and a.remote.canary_digest.startswith("sha256:")
    predicted = remote.predict(point(0.3 / 4), sigma=SIGMA, n=500, seed=1)
    assert predicted.prediction == 1 and predicted.remote.canary_digest == a.remote.canary_digest
    # A model that answers class indices is counted the same way.
    classes = remote_certifier(tmp_path, server.url, "tiny-class", output_kind="class")
    c = classes.certify(point(0.3 / 4), sigma=SIGMA, n0=50, n=3000, alpha=0.001, seed=0, batch_size=200)
    first = remote.certify(point(0.3 / 4), sigma=SIGMA, n0=50, n=3000, alpha=0.001, seed=0, batch_size=200)
    assert (c.prediction, c.radius, c.n_a) == (first.prediction, first.radius, first.n_a)


def test_remote_certificates_pass_the_exact_answer_check_and_the_check_catches_a_plug_in_radius(server, tmp_path):
    remote = remote_certifier(tmp_path, server.url)
    runs, alpha, exact = 300, 0.1, 0.6 * SIGMA
    x = point(exact / 4)
    certs = [remote.certify(x, sigma=SIGMA, n0=50, n=400, alpha=alpha, seed=s, batch_size=200) for s in range(runs)]
    violations = sum(c.prediction is not None and (c.prediction != 1 or c.radius > exact) for c in certs)
    assert_rate_at_most(violations, runs, alpha, "remote CERTIFY radius above the exact distance")
    from scipy.stats import norm

    plug_in = sum(c.prediction is not None and SIGMA * float(norm.ppf(min(c.n_a / c.n, 1 - 1e-12))) > exact
                  for c in certs)
    assert rate_is_too_high(plug_in, runs, alpha)


def test_a_batch_dependent_model_is_refused(server, tmp_path):
    with pytest.raises(RemoteError, match="depends on the rest of the batch"):
        remote_certifier(tmp_path, server.url, "batch-norm").warm_up()


@pytest.mark.parametrize("model, message", [("nan", "NaN"), ("three", "num_classes 2")])
def test_answers_that_cannot_be_counted_are_errors(server, tmp_path, model, message):
    with pytest.raises(RemoteError, match=message):
        remote_certifier(tmp_path, server.url, model).certify(point(0.1), sigma=SIGMA, n=100, seed=0)


def test_a_model_replaced_mid_job_fails_the_job(server, tmp_path):
    server.flag.unlink(missing_ok=True)
    remote = remote_certifier(tmp_path, server.url, "tiny-flip", canary_every=3)
    remote.warm_up()

    def replace(stage, done, total):  # between two estimation batches
        if stage == "estimation" and done >= 600:
            server.flag.touch()

    try:
        with pytest.raises(RemoteChanged, match="changed"):
            remote.certify(point(0.3 / 4), sigma=SIGMA, n0=50, n=4000, alpha=0.001, seed=0, batch_size=200,
                           progress=replace)
        # The next job pins the model as it now is, and its certificate names the new digest.
        before = remote.remote.canary_digest
        cert = remote.certify(point(0.3 / 4), sigma=SIGMA, n0=50, n=1000, alpha=0.001, seed=0, batch_size=200)
        assert cert.remote.canary_digest != before and cert.prediction == 0  # the classes are swapped now
    finally:
        server.flag.unlink(missing_ok=True)


def test_a_server_killed_mid_job_fails_it_without_dropping_a_sample(tmp_path):
    dying = RemoteServer(tmp_path, free_port())
    dying.start()
    remote = remote_certifier(tmp_path, dying.url, retries=2, timeout_seconds=2)
    remote.warm_up()

    def kill(stage, done, total):
        if stage == "estimation" and done >= 400:
            dying.stop()

    with pytest.raises(RemoteUnavailable, match="did not answer after 3 attempts"):
        remote.certify(point(0.1), sigma=SIGMA, n0=50, n=4000, alpha=0.001, seed=0, batch_size=200, progress=kill)


# --- the network, with stand-ins that misbehave on purpose ---------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers from `script` (a list of (status, headers, body)), recording every request."""

    script: list = []
    seen: list = []

    def do_POST(self):  # noqa: N802 - the standard library's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append((self.headers.get("Authorization"), body))
        status, headers, payload = type(self).script.pop(0) if type(self).script else (500, {}, b"{}")
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def stand_in():
    handler = type("Handler", (_Recorder,), {"script": [], "seen": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()


def _ok(rows: int) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps({"model_name": "m", "outputs": [
        {"name": "output", "datatype": "FP32", "shape": [rows, 2], "data": [0.0, 1.0] * rows}]}).encode()


def test_a_failed_batch_is_sent_again_with_the_same_bytes(stand_in, tmp_path):
    url, handler = stand_in
    net = load_bundle(remote_bundle(tmp_path / "m", url, "m", retries=2, canaries=1),
                      remote=RemoteOptions(allow=(url,))).classifier
    handler.script += [_ok(1), _ok(1)]  # the canary, alone and in a batch of one
    net.establish()
    handler.seen.clear()
    handler.script += [(503, {}, b'{"error": "busy"}'), _ok(5)]
    out = net(torch.rand(5, 1, 4, 4))
    assert out.shape == (5, 2) and len(handler.seen) == 2 and handler.seen[0][1] == handler.seen[1][1]


def test_redirects_are_never_followed_and_tokens_go_only_to_their_origin(stand_in, tmp_path):
    url, handler = stand_in
    options = RemoteOptions(allow=(url,), tokens={url: "secret", "http://elsewhere:80": "other"})
    net = load_bundle(remote_bundle(tmp_path / "m", url, "m", canaries=1), remote=options).classifier
    handler.script += [(307, {"Location": "http://169.254.169.254/"}, b"")]
    with pytest.raises(RemoteError, match="redirect"):
        net.establish()
    assert [auth for auth, _ in handler.seen] == ["Bearer secret"]


def test_endpoints_must_be_allowed_and_never_link_local_or_metadata():
    assert allowed("https://triton.internal:8000/v2x", ["https://triton.internal:8000"])
    assert not allowed("https://triton.internal:8001", ["https://triton.internal:8000"])
    assert not allowed("http://triton.internal:8000", ["https://triton.internal:8000"])  # another scheme
    assert not allowed("https://triton.internal:8000/b", ["https://triton.internal:8000/a"])
    with pytest.raises(BundleError, match="allow-list"):
        resolve("http://127.0.0.1:9", RemoteOptions())
    for url in ("http://169.254.169.254/latest", "http://[fe80::1]:80", "http://[::ffff:169.254.169.254]:80",
                "http://0.0.0.0:80"):
        with pytest.raises(BundleError, match="refused"):
            resolve(url, RemoteOptions(allow=("*",)))
    with pytest.raises(BundleError, match="credentials"):
        resolve("http://user:pw@127.0.0.1:9", RemoteOptions(allow=("*",)))
    pinned = resolve("http://localhost:9", RemoteOptions(allow=("http://localhost:9",)))
    assert pinned.address in ("127.0.0.1", "::1") and pinned.host == "localhost"
