"""Cross-job batching and the automatic batch size (smoothcert.batching)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from smoothcert.batching import BatchScheduler, auto_batch_size
from smoothcert.bundle import load_bundle
from smoothcert.certifier import Certifier
from smoothcert.sampling import make_generator, noisy_batch, sample_counts

from .exact import HalfSpace, point_at


class Slow(nn.Module):
    """`inner`, with a pause per pass so that concurrent jobs' batches queue up and merge."""

    def __init__(self, inner: nn.Module, pause: float = 0.01):
        super().__init__()
        self.inner, self.pause, self.calls, self.rows = inner, pause, 0, []

    def forward(self, x):
        self.calls += 1
        self.rows.append(x.shape[0])
        time.sleep(self.pause)
        return self.inner(x)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def run_jobs(classifier, inputs, seeds, *, sigma=0.5, num=3000, batch=256, concurrent=True, device="cpu"):
    """Counts of one job per (input, seed), run in threads at once or one after another."""
    out: list = [None] * len(inputs)

    def job(i):
        out[i] = sample_counts(classifier, inputs[i].to(device), sigma, num, num_classes=10, batch_size=batch,
                               generator=make_generator(seeds[i], device))

    if concurrent:
        threads = [threading.Thread(target=job, args=(i,)) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(inputs)):
            job(i)
    return out


@pytest.fixture(scope="module")
def digits():
    return load_bundle("models/digits")


@pytest.mark.parametrize("device", DEVICES)
def test_merged_jobs_keep_their_own_counts_exactly(device):
    """Eight jobs through one scheduler: the passes carry several jobs' rows, and each job's
    counts equal that job run alone, directly, with the same seed (on a GPU too, where a
    merged pass is a larger batch for cuDNN/cuBLAS to choose kernels for)."""
    digits = load_bundle("models/digits", device=torch.device(device))
    net = Slow(digits.classifier)
    rng = np.random.default_rng(0)
    inputs = [torch.from_numpy(rng.random(digits.spec.input_shape, dtype=np.float32)) for _ in range(8)]
    seeds = list(range(100, 108))
    alone = run_jobs(digits.classifier, inputs, seeds, concurrent=False, device=device)
    scheduler = BatchScheduler()
    try:
        merged = run_jobs(scheduler.bind(net, max_rows=4096), inputs, seeds, device=device)
    finally:
        scheduler.close()
    for a, m in zip(alone, merged, strict=True):
        assert np.array_equal(a, m)
    assert scheduler.requests == 8 * 12  # 3000 = 11 × 256 + 184 per job
    assert scheduler.passes < scheduler.requests and max(net.rows) > 256  # merging happened
    assert max(net.rows) <= 4096


@pytest.mark.parametrize("device", DEVICES)
def test_exact_model_counts_are_identical_with_and_without_merging(device):
    model = HalfSpace(torch.linspace(-1, 1, 16), b=0.05).eval()
    inputs = [point_at(model, (1, 4, 4), d) for d in (-0.3, -0.1, 0.0, 0.1, 0.3)]
    model = model.to(device)
    seeds = [1, 2, 3, 4, 5]
    alone = run_jobs(model, inputs, seeds, concurrent=False, device=device)
    scheduler = BatchScheduler()
    try:
        merged = run_jobs(scheduler.bind(Slow(model), max_rows=1024), inputs, seeds, device=device)
    finally:
        scheduler.close()
    assert all(np.array_equal(a, m) for a, m in zip(alone, merged, strict=True))


def test_a_pass_never_exceeds_the_limit_and_big_requests_run_alone():
    net = Slow(nn.Flatten(), pause=0.005)
    scheduler = BatchScheduler()
    bound = scheduler.bind(net, max_rows=100)
    sizes = [40, 40, 40, 250, 10, 70]
    out: list = [None] * len(sizes)

    def job(i):
        out[i] = sample_counts(bound, torch.zeros(2), 1.0, 2 * sizes[i], num_classes=2, batch_size=sizes[i],
                               generator=make_generator(i, "cpu"))

    threads = [threading.Thread(target=job, args=(i,)) for i in range(len(sizes))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        scheduler.close()
    for i, counts in enumerate(out):  # every job got exactly its own rows counted
        assert counts.sum() == 2 * sizes[i]
    assert all(rows <= 100 or rows == 250 for rows in net.rows)


class Failing(nn.Module):
    def __init__(self):
        super().__init__()
        self.fail = True

    def forward(self, x):
        if self.fail:
            raise RuntimeError("boom")
        return torch.stack([x.flatten(1).sum(1), -x.flatten(1).sum(1)], dim=1)


def test_a_failing_pass_fails_its_jobs_and_the_scheduler_goes_on():
    net = Failing()
    scheduler = BatchScheduler()
    bound = scheduler.bind(net, max_rows=10)
    sample = dict(num_classes=2, batch_size=5)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            sample_counts(bound, torch.ones(2), 0.1, 10, generator=make_generator(0, "cpu"), **sample)
        net.fail = False
        counts = sample_counts(bound, torch.ones(2), 0.1, 10, generator=make_generator(0, "cpu"), **sample)
        assert counts.tolist() == [10, 0]
    finally:
        scheduler.close()
    with pytest.raises(RuntimeError, match="closed"):
        sample_counts(bound, torch.ones(2), 0.1, 10, generator=make_generator(0, "cpu"), **sample)


def test_auto_batch_size_is_bounded_by_memory(digits):
    free = auto_batch_size(digits.classifier, digits.spec.input_shape, "cpu", probe_seconds=0.5)
    assert 16 <= free.rows <= free.max_rows
    tight = auto_batch_size(digits.classifier, digits.spec.input_shape, "cpu", budget_bytes=200_000)
    assert tight.max_rows < free.max_rows and tight.rows <= max(tight.max_rows, 16)


class Timed:
    """A network whose passes take `seconds(rows)` (sleeping), except that the passes named in
    `lucky` (call numbers at one size) return at once: one spell of a fast machine."""

    def __init__(self, seconds, lucky_rows: int, lucky: range):
        self.seconds, self.lucky_rows, self.lucky, self.calls = seconds, lucky_rows, lucky, {}

    def __call__(self, x):
        rows = x.shape[0]
        self.calls[rows] = self.calls.get(rows, 0) + 1
        if not (rows == self.lucky_rows and self.calls[rows] in self.lucky):
            time.sleep(self.seconds(rows))
        return torch.zeros((rows, 2))


def test_auto_batch_size_is_not_decided_by_one_lucky_measurement():
    # 16 rows sustain 1,000 rows/s, 32 and more 1,600/s, but the first measured passes at 16
    # rows return at once (after the two warm-up passes): one measurement would pick 16.
    network = Timed(lambda rows: 0.016 if rows == 16 else rows / 1600, lucky_rows=16, lucky=range(3, 9))
    chosen = auto_batch_size(network, (2,), "cpu", budget_bytes=64 * 8, probe_seconds=3.0)
    assert network.calls[16] > 9, "the probe measured 16 rows again after the lucky spell"
    assert chosen.rows == 32 and chosen.max_rows == 64


def test_a_certifier_through_a_scheduler_gives_the_same_certificate(digits):
    x = np.random.default_rng(3).random(digits.spec.input_shape, dtype=np.float32)
    direct = Certifier(digits, device="cpu").certify(x, n=2000, batch_size=300, seed=9)
    routed = Certifier(digits, device="cpu")
    scheduler = BatchScheduler()
    try:
        routed.route_through(scheduler)
        cert = routed.certify(x, n=2000, batch_size=300, seed=9)
    finally:
        scheduler.close()
    assert (cert.prediction, cert.radius, cert.n_a) == (direct.prediction, direct.radius, direct.n_a)
    assert scheduler.passes == 1 + 7  # selection + ceil(2000 / 300), one job: nothing to merge


def test_automatic_batch_size_is_recorded(digits):
    certifier = Certifier(digits, device="cpu")
    cert = certifier.certify(np.zeros(digits.spec.input_shape, np.float32), n=500, seed=0)
    assert cert.batch_size == certifier.batch.rows


def test_noise_drawn_into_a_slice_of_a_buffer_is_the_same_draw():
    x = torch.rand(3, 4, 4)
    alone = noisy_batch(x, 0.5, 7, make_generator(5, "cpu"))
    buffer = torch.zeros(20, 3, 4, 4)
    noisy_batch(x, 0.5, 7, make_generator(5, "cpu"), out=buffer[9:16])
    assert torch.equal(buffer[9:16], alone) and not buffer[:9].any() and not buffer[16:].any()
