"""σ selector models through the worker (`run_job` against a real redis-server): results that
record both stages, PREDICT, and answers that do not depend on arrival order or worker."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from smoothcert.architectures import build_architecture
from smoothcert.bundle import save_bundle, zip_bundle
from tests.workers.helpers import SHAPE, constant, new_job
from workers.jobs import run_job
from workers.runtime import ModelRuntime

LEVELS = [0.25, 0.5]


def linear(outputs: int, gap_per_mean: float, at: float) -> torch.nn.Module:
    """Class 1 iff the mean pixel exceeds `at` (an exact half-space, as tests/workers' tiny)."""
    net = build_architecture("linear", SHAPE, outputs)
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.zero_()
        net.fc.weight[1].fill_(gap_per_mean / 16)
        net.fc.bias[1] = -gap_per_mean * at
    return net


@pytest.fixture()
def chooser(store, tmp_path) -> str:
    """Level 1 (σ = 0.5) above mean 0.3; one classifier for both levels, class 1 above 0.5."""
    spec = {"name": "chooser", "kind": "selector", "input_shape": list(SHAPE), "num_classes": 2,
            "labels": ["low", "high"], "architecture": "linear",
            "selector": {"sigmas": LEVELS, "sigma_e": 0.5, "experts": "shared"}}
    digest = save_bundle(tmp_path, spec, (linear(2, 40.0, 0.3), linear(2, 40.0, 0.5)), fmt="state_dict")
    store.put_model("chooser", digest, spec, zip_bundle(tmp_path))
    return digest


def test_a_selector_certificate_records_both_stages(store, runtime, settings, chooser):
    job_id = new_job(store, chooser, constant(0.8), model="chooser", n0=50, n=2000, alpha=0.01, seed=3)
    assert run_job(store, runtime, job_id, settings) == "succeeded"
    result = store.get_job(job_id).result
    sel = result["selector"]
    assert (result["prediction"], result["label"], result["sigma"]) == (1, "high", 0.5)
    assert sel["sigmas"] == LEVELS and sel["sigma_index"] == 1 and sel["sigma_e"] == 0.5
    assert sel["alpha_sigma"] == sel["alpha_class"] == 0.005 and result["alpha"] == 0.01
    assert result["radius"] == min(sel["radius_sigma"], sel["radius_class"]) > 0
    assert sel["estimator"]["prediction"] == 1 and sel["estimator"]["sigma"] == 0.5
    assert result["memory"] == {"used": False} and result["guarantee"]["scope"] == "selector"
    assert result["samples"] == 2 * (50 + 2000) and result["seed"] == 3
    # the exact truth: mean 0.8 is 4·0.5 = 2.0 from the estimator's plane and 1.2 from the class's
    assert result["radius"] <= 1.2


def test_a_selector_prediction_chooses_the_level_then_the_class(store, runtime, settings, chooser):
    job_id = new_job(store, chooser, constant(0.2), kind="prediction", model="chooser", n=2000, alpha=0.01)
    assert run_job(store, runtime, job_id, settings) == "succeeded"
    result = store.get_job(job_id).result
    assert (result["prediction"], result["label"], result["sigma"]) == (0, "low", 0.25)
    assert result["selector"]["sigma_index"] == 0 and result["selector"]["radius_sigma"] is None


def test_answers_do_not_depend_on_arrival_order_or_worker(store, settings, chooser):
    """The same inputs and seeds certified in two orders by two runtimes at once give the same
    certificates: a selector has no memory for earlier answers to shape later ones."""
    rng = np.random.default_rng(0)
    inputs = [np.clip(rng.uniform(0.1, 0.9) + rng.normal(0, 0.1, SHAPE), 0, 1).astype(np.float32)
              for _ in range(8)]

    def certify_all(order: list[int], out: dict) -> None:
        runtime = ModelRuntime(store, settings)
        for i in order:
            job_id = new_job(store, chooser, inputs[i], model="chooser", n0=50, n=1000, alpha=0.01, seed=100 + i)
            assert run_job(store, runtime, job_id, settings) == "succeeded"
            result = store.get_job(job_id).result
            out[i] = {k: v for k, v in result.items() if k not in ("seconds",)}

    first, second = {}, {}
    threads = [threading.Thread(target=certify_all, args=(list(range(8)), first)),
               threading.Thread(target=certify_all, args=(list(reversed(range(8))), second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(first) == len(second) == 8
    for i in range(8):
        a, b = first[i], second[i]
        a["selector"]["estimator"].pop("seconds", None), b["selector"]["estimator"].pop("seconds", None)
        assert a == b, i
    assert {first[i]["selector"]["sigma_index"] for i in range(8)} <= {0, 1, None}
