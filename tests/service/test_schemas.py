"""Property tests of the request schemas: any JSON value is either refused with a
ValidationError (never another exception) or accepted with the invariants every later step
relies on."""

from __future__ import annotations

import base64
import io
import math
import zipfile

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service.schemas import CertificationRequest, InferRequest, PredictionRequest

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
inputs = st.sampled_from([{"tensor": [[0.5, 0.25]]}, {"image_b64": "aGk="}, {"npy_b64": "aGk="}])
plausible = st.fixed_dictionaries({"model": st.sampled_from(["digits", "m.2_x"]), "input": inputs}, optional={
    "sigma": st.sampled_from([None, None, 0.0, 0.25, 1e300]), "sigma_search": st.sampled_from([None, "ddrs", "x"]),
    "bound": st.sampled_from(["cohen", "two_sided", "drs"]), "n0": st.integers(0, 1000), "n": st.integers(0, 10**6),
    "alpha": st.floats(0, 1), "batch_size": st.integers(0, 10**4), "memory": st.booleans(),
    "seed": st.integers(-1, 2**63), "numeric_mode": st.sampled_from(["fp32", "bf16+compile"]),
})


@st.composite
def bodies(draw):
    """Plausible requests with up to two fields replaced by any JSON value; or any JSON value."""
    if draw(st.integers(0, 9)) == 9:
        return draw(json_values)
    body = draw(plausible)
    for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=2, unique=True)):
        body[key] = draw(json_values)
    return body


def accepted(model, data):
    try:
        return model.model_validate(data)
    except ValidationError:
        return None


@settings(max_examples=300, deadline=None)
@given(data=bodies())
def test_certification_requests(data):
    r = accepted(CertificationRequest, data)
    if r is None:
        return
    assert isinstance(r.model, str) and 1 <= len(r.model) <= 128 and "/" not in r.model
    assert 0 < r.alpha < 1 and 1 <= r.n0 <= r.n
    assert r.sigma is None or (math.isfinite(r.sigma) and r.sigma > 0)
    assert r.sigma is None or r.sigma_search is None
    assert r.seed is None or 0 <= r.seed < 2**63
    assert r.batch_size is None or r.batch_size >= 1
    given_inputs = [v for v in (r.input.tensor, r.input.image_b64, r.input.npy_b64) if v is not None]
    assert len(given_inputs) == 1
    assert CertificationRequest.model_validate(r.model_dump()) == r  # what the API stores validates again


@settings(max_examples=300, deadline=None)
@given(data=bodies())
def test_prediction_requests(data):
    r = accepted(PredictionRequest, data)
    if r is not None:
        assert 0 < r.alpha < 1 and r.n >= 1 and (r.sigma is None or (math.isfinite(r.sigma) and r.sigma > 0))
        assert PredictionRequest.model_validate(r.model_dump()) == r


@settings(max_examples=200, deadline=None)
@given(data=st.fixed_dictionaries({"inputs": st.lists(st.fixed_dictionaries({}, optional={
    "name": json_values, "shape": st.lists(st.integers(-1, 9), max_size=5) | json_values,
    "datatype": st.sampled_from(["FP32", "UINT8", "FP64"]) | json_values,
    "data": st.lists(st.floats(), max_size=5) | json_values}), max_size=2)}, optional={"parameters": json_values})
       | json_values)
def test_infer_requests(data):
    r = accepted(InferRequest, data)
    if r is not None:
        assert len(r.inputs) == 1 and 2 <= len(r.inputs[0].shape) <= 4 and min(r.inputs[0].shape) >= 1


def test_the_openapi_examples_are_valid_requests():
    """Each documented example is a request the schemas accept (the API accepting them, model
    and limits included, is tests/service/test_openapi.py's), and the schema is the same in
    every API process: the example .npz is byte for byte the same on every build."""
    from service import schemas

    for model, examples in [(CertificationRequest, schemas.CERTIFICATION_EXAMPLES),
                            (PredictionRequest, schemas.PREDICTION_EXAMPLES),
                            (schemas.EvaluationRequest, schemas.EVALUATION_EXAMPLES),
                            (InferRequest, schemas.INFER_EXAMPLES)]:
        for example in examples.values():
            model.model_validate(example["value"])
    for model, form in [(schemas.CertificationParams, schemas.CERTIFICATION_FORM_EXAMPLE),
                        (schemas.PredictionParams, schemas.PREDICTION_FORM_EXAMPLE),
                        (schemas.EvaluationParams, schemas.EVALUATION_FORM_EXAMPLE)]:
        model.model_validate(form)
    npz = base64.b64decode(schemas.EVALUATION_EXAMPLES["npz"]["value"]["dataset_b64"])
    with zipfile.ZipFile(io.BytesIO(npz)) as zf:  # no time stamp of the build in it
        assert {info.date_time for info in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    data = np.load(io.BytesIO(npz), allow_pickle=False)
    assert data["x"].tolist() == [schemas.DIGIT_7_PIXELS] and data["y"].tolist() == [7]
    from PIL import Image

    png = Image.open(io.BytesIO(base64.b64decode(schemas.DIGIT_7_PNG_B64)))
    assert np.asarray(png).tolist() == schemas.DIGIT_7_PIXELS  # the PNG and the pixels are one image
