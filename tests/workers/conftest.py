"""Fixtures of the worker tests: the store on the test redis-server, settings pointing at
it, and the tiny exact bundle registered as model "tiny"."""

from __future__ import annotations

import pytest

from service.store import Store
from tests.workers.helpers import make_bundle, settings_for, store_for
from workers.runtime import ModelRuntime


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> tuple[str, dict, bytes]:
    return make_bundle(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def settings(redis_url):
    return settings_for(redis_url)


@pytest.fixture()
def store(redis_client, settings) -> Store:  # redis_client: a flushed database
    return store_for(settings)


@pytest.fixture()
def digest(store, bundle) -> str:
    digest, spec, data = bundle
    store.put_model("tiny", digest, spec, data)
    return digest


@pytest.fixture()
def runtime(store, settings) -> ModelRuntime:
    return ModelRuntime(store, settings)
