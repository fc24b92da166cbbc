"""Drives kandle-server's Open Inference Protocol with Triton's official HTTP client,
unchanged: binary tensors (its default) and JSON, a 2-D input and one input per feature.

Usage: triton_client.py (BASE_URL MODEL FIXTURE_DIR)...
"""

import json
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def check(base, model, fixture):
    client = httpclient.InferenceServerClient(url=base.removeprefix("http://"))
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(model)
    meta = client.get_model_metadata(model)
    names = [i["name"] for i in meta["inputs"]]
    expected = json.load(open(f"{fixture}/expected.json"))
    rows = np.array(
        [[np.nan if v is None else v for v in row] for row in expected["inputs"]],
        dtype=np.float64,
    )
    want = np.array(expected["probabilities"])

    # One 2-D input, sent and answered as binary tensors (the client's default).
    matrix = httpclient.InferInput("input-0", list(rows.shape), "FP64")
    matrix.set_data_from_numpy(rows)
    result = client.infer(model, [matrix])
    got = result.as_numpy("probabilities")
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.abs(got - want).max() <= 1e-6, np.abs(got - want).max()
    assert (result.as_numpy("label") == want.argmax(axis=1)).all()

    # One 1-D input per feature, in JSON both ways.
    inputs = []
    for i, name in enumerate(names):
        column = httpclient.InferInput(name, [len(rows)], "FP64")
        column.set_data_from_numpy(rows[:, i].copy(), binary_data=False)
        inputs.append(column)
    wanted = [httpclient.InferRequestedOutput("probabilities", binary_data=False)]
    result = client.infer(model, inputs, outputs=wanted)
    assert np.abs(result.as_numpy("probabilities") - want).max() <= 1e-6

    # A bad request raises the client's own error, with the server's message.
    wrong = httpclient.InferInput("input-0", [1, 99], "FP64")
    wrong.set_data_from_numpy(np.zeros((1, 99)))
    try:
        client.infer(model, [wrong])
        raise AssertionError("a wrong shape was accepted")
    except InferenceServerException as e:
        assert "99 columns" in e.message(), e.message()


args = sys.argv[1:]
for at in range(0, len(args), 3):
    check(*args[at : at + 3])
print("ok")
