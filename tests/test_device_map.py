"""A model spread with a device map (here CPU plus disk offload; GPU plus CPU in test_cuda.py) gives the
tables of the unspread model; --max-memory passes through to accelerate and bad values are one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_models import random_lens, save_tiny_model

from lenses import LensesError, LogitLens, ModelAdapter, load_model
from lenses.tracing.evaluate import evaluate
from lenses.tracing.trace import TraceItem, trace

ROOT = Path(__file__).parent.parent
SPREAD = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
          "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("m") / "m")
    plain, _ = load_model(folder)
    spread, _ = load_model(folder, device_map=SPREAD)
    assert {"disk", "cpu"} <= set(spread.hf_device_map.values())
    return ModelAdapter.from_model(plain), ModelAdapter.from_model(spread)


def test_trace_and_evaluation_of_a_spread_model_equal_the_plain_one(models):
    plain, spread = models
    items = [TraceItem(list(range(5, 25)), [3, 9, 19], {"next": [1, 2, 3]}),
             TraceItem(list(range(40, 52)), [0, 11], {"next": [4, 5]})]
    tables = []
    for adapter in (plain, spread):
        lens = random_lens(adapter)
        tables.append(trace(adapter, {"logit": LogitLens(adapter), "tuned": lens}, items, batch_size=2))
    a, b = tables
    assert (a.top1_id.to_numpy() == b.top1_id.to_numpy()).all() and (a.rank_next == b.rank_next).all()
    np.testing.assert_allclose(b.kl, a.kl, atol=1e-5)
    import torch

    blocks = torch.arange(2 * 16).reshape(2, 16) % 200 + 1
    ev = [evaluate(adapter, {"logit": LogitLens(adapter)}, blocks).table() for adapter in (plain, spread)]
    np.testing.assert_allclose(ev[1].kl_nats, ev[0].kl_nats, atol=1e-5)


def test_max_memory_passes_through_to_accelerate(tmp_path):
    folder = save_tiny_model(tmp_path / "m")
    model, _ = load_model(folder, device_map="auto", max_memory="cpu=1GiB")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(LensesError, match="offloaded to disk"):  # the cap reached accelerate: the tail went to disk
        ModelAdapter.from_model(load_model(folder, device_map="auto", max_memory="cpu=20KiB")[0])
    with pytest.raises(LensesError, match="add --device-map auto"):
        load_model(folder, max_memory="cpu=1GiB")
    from lenses.jobs.train import TrainConfig

    with pytest.raises(LensesError, match="add --device-map auto"):  # refused as the options are made
        TrainConfig(model=str(folder), max_memory="cpu=1GiB", out=str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("value", ["0:70GiB", "gpu0=70GiB", "cpu=lots"])
def test_bad_max_memory_is_one_line_and_status_2(tmp_path, value):
    import contextlib
    import io

    from lenses.__main__ import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["analyze", "--max-memory", value, "--device-map", "auto"])
    assert rc == 2 and err.getvalue().startswith("error: ") and err.getvalue().count("\n") == 1, err.getvalue()
    assert "--max-memory" in err.getvalue() or "memory size" in err.getvalue()
