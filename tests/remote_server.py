"""A real Open Inference Protocol v2 server for the remote-model tests: KServe's ModelServer on
a loopback port, serving models whose smoothed answers are exact (docs/algorithms.md §8).

    python -m tests.remote_server PORT FLAG_FILE [BUNDLE]

Models (inputs [B, 1, 4, 4] float32 in [0, 1]; "tiny" is the exact linear model of
tests/workers/helpers.py: class 1 iff the mean pixel exceeds 1/2):
- `tiny`: logits [B, 2] = (0, 40·(mean − 1/2));
- `tiny-class`: the class index [B] (INT64);
- `tiny-flip`: `tiny` until FLAG_FILE exists, then the classes swapped (a model replaced
  under the same name mid-job);
- `batch-norm`: logits of the mean minus the batch's mean (an answer that depends on the
  rest of the batch);
- `nan`: NaN logits; `three`: logits [B, 3] for a two-class bundle;
- with BUNDLE (a smoothcert bundle directory), `bundle`: its network's logits, run by torch on
  the CPU in this process (benchmarks/remote.py serves the demo model so).
Run by `RemoteServer` below, which the tests start and stop.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCALE = 40.0


def logits(x: np.ndarray) -> np.ndarray:
    z = SCALE * (x.reshape(x.shape[0], -1).astype(np.float64).mean(axis=1) - 0.5)
    return np.stack([np.zeros_like(z), z], axis=1).astype(np.float32)


def serve(port: int, flag: Path, bundle: str | None = None) -> None:
    from kserve import Model, ModelServer
    from kserve.protocol.infer_type import InferOutput, InferResponse

    class Served(Model):
        def __init__(self, name: str, answer):
            super().__init__(name)
            self.answer = answer
            self.ready = True

        async def predict(self, payload, headers=None, response_headers=None):
            x = payload.inputs[0].as_numpy()
            y = self.answer(x)
            out = InferOutput(name="output", shape=list(y.shape), datatype="INT64" if y.dtype == np.int64 else "FP32")
            out.set_data_from_numpy(y, binary_data=payload.use_binary_outputs)
            return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id or uuid.uuid4().hex)

    def flip(x):
        y = logits(x)
        return y[:, ::-1].copy() if flag.exists() else y

    def batch_norm(x):
        m = x.reshape(x.shape[0], -1).mean(axis=1)
        z = SCALE * (m - m.mean())
        return np.stack([np.zeros_like(z), z], axis=1).astype(np.float32)

    models = [
        Served("tiny", logits),
        Served("tiny-class", lambda x: logits(x).argmax(axis=1).astype(np.int64)),
        Served("tiny-flip", flip),
        Served("batch-norm", batch_norm),
        Served("nan", lambda x: np.full((x.shape[0], 2), np.nan, dtype=np.float32)),
        Served("three", lambda x: np.zeros((x.shape[0], 3), dtype=np.float32)),
    ]
    if bundle is not None:
        import torch

        from smoothcert.bundle import load_bundle

        network = load_bundle(bundle).classifier

        def run(x):
            with torch.inference_mode():
                return network(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

        models.append(Served("bundle", run))
    ModelServer(http_port=port, enable_grpc=False, workers=1, enable_docs_url=False).start(models)


class RemoteServer:
    """The server above as a subprocess on a free loopback port; `stop()` kills it."""

    def __init__(self, folder: Path, port: int, bundle: str | Path | None = None):
        self.folder, self.port, self.bundle = folder, port, bundle
        self.flag = folder / "flip"
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        args = [sys.executable, "-m", "tests.remote_server", str(self.port), str(self.flag)]
        args += [str(self.bundle)] if self.bundle is not None else []
        self.proc = subprocess.Popen(args,
                                     cwd=ROOT, env=env, stdout=open(self.folder / "server.log", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.folder / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.url}/v2/models/tiny/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("the KServe model server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


if __name__ == "__main__":
    serve(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
