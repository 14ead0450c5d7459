"""Sampling through a remote model (smoothcert.remote) against the same model in process.

The demo model (models/digits) is served by KServe's ModelServer on loopback
(tests/remote_server.py: torch on the CPU, in its own process, binary tensors over the Open
Inference Protocol v2) and certified through a remote bundle; the baseline is the very same
bundle run in this process. Both sample at the batch size the in-process probe picks for the
model on this machine (`Certifier.batch`), each certification with its own seed, fixed σ,
n0 = 100 and n = `--n`; both give the same certificates (checked). Reported: samples per
second each way and their ratio (remote / in process), and the canary overhead (requests for
canaries per request for samples). On 2 cores the server and this process share the CPU:
the remote figure includes the server's forward passes, the protocol and the copies.

    python benchmarks/remote.py
    python benchmarks/remote.py --n 20000 --repeats 5 --json /tmp/remote.json

The exit code is 0 whatever the outcome: a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import OtherLoad, machine_lines
from smoothcert.bundle import load_bundle
from smoothcert.certifier import Certifier
from smoothcert.data import load_digits_split
from smoothcert.endpoints import RemoteOptions
from tests.conftest import free_port
from tests.remote_server import RemoteServer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "digits"


def remote_bundle(folder: Path, url: str, rows: int) -> Path:
    spec = json.loads((DEMO / "model.json").read_text())
    for key in ("architecture", "architecture_args"):
        spec.pop(key, None)
    # The served network applies the bundle's normalisation itself: send [0, 1] pixels.
    spec.pop("normalize", None)
    spec |= {"kind": "remote", "remote": {"endpoint": url, "model": "bundle", "input": "x", "output": "output",
                                          "max_batch": rows}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(json.dumps(spec))
    return folder


def timed(certifier: Certifier, images, args, rows: int) -> tuple[float, list]:
    started = time.perf_counter()
    certs = [certifier.certify(x, sigma=0.25, n0=100, n=args.n, alpha=0.001, seed=k, batch_size=rows)
             for k, x in enumerate(images)]
    return time.perf_counter() - started, certs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="estimation samples per certification")
    parser.add_argument("--images", type=int, default=4, help="certifications per timed round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds each way, interleaved")
    parser.add_argument("--json", type=Path, help="write every measured number here")
    args = parser.parse_args(argv)
    for line in machine_lines(torch.device("cpu")):
        print(line)
    local = Certifier(load_bundle(DEMO), device="cpu")
    rows = local.batch.rows
    print(f"probe: {rows} rows per forward pass (in process); the remote bundle sends {rows} per request")
    _, _, x_test, _ = load_digits_split(0)
    images = [x_test[k] for k in range(args.images)]
    with tempfile.TemporaryDirectory() as tmp:
        server = RemoteServer(Path(tmp), free_port(), bundle=DEMO)
        server.start()
        try:
            url = server.url
            remote = Certifier(load_bundle(remote_bundle(Path(tmp) / "remote", url, rows),
                                           remote=RemoteOptions(allow=(url,))), device="cpu")
            remote.warm_up()
            timed(remote, images[:1], argparse.Namespace(n=1000), rows)  # connections, caches
            times = {"in_process": [], "remote": []}
            load = OtherLoad()
            for _ in range(args.repeats):
                for name, certifier in (("in_process", local), ("remote", remote)):
                    seconds, certs = timed(certifier, images, args, rows)
                    times[name].append(seconds)
                    if name == "in_process":
                        expected = [(c.prediction, c.radius) for c in certs]
                    else:
                        same = [(c.prediction, c.radius) for c in certs] == expected
            other = load.cores()
            checks = remote.remote.canary_checks
        finally:
            server.stop()
    samples = args.images * (100 + args.n)
    rate = {k: samples / statistics.median(v) for k, v in times.items()}
    ratio = rate["remote"] / rate["in_process"]
    requests = args.repeats * args.images * -(-(100 + args.n) // rows)
    print(f"in process: {rate['in_process']:,.0f} samples/s; remote: {rate['remote']:,.0f} samples/s "
          f"(medians of {args.repeats} rounds of {args.images} certifications, n = {args.n})")
    print(f"other processes used {other:.2f} cores while timing" if other is not None else "")
    print(f"INFO remote / in process = {ratio:.3f}; the same certificates: {same}; "
          f"canary batches {checks} for about {requests} sample requests")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "n": args.n, "images": args.images, "times": times,
                                         "samples_per_second": rate, "ratio": ratio, "same": same,
                                         "canary_checks": checks, "other_cores": other,
                                         "machine": machine_lines(torch.device("cpu"))}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
