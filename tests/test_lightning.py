"""The PyTorch Lightning example: checkpoint and resume restore the compiled layer exactly (an interrupted run
ends with the parameters of an uninterrupted one, bit for bit). Needs the optional `lightning` extra."""
from __future__ import annotations

import sys

import pytest
import torch

from tests.conftest import ROOT

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pytorch_lightning.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning_fabric.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*Checkpoint directory .* exists:UserWarning"),
]


@pytest.fixture(scope="module")
def lightning_box():
    """examples/lightning_box.py, imported when a test runs, not at collection: pytorch_lightning takes seconds to
    import, and every process of a parallel run (pytest -n) collects every test file."""
    pytest.importorskip("pytorch_lightning", reason="the optional extra: pip install 'fpidsl[lightning]'")
    sys.path.insert(0, str(ROOT / "examples"))
    import lightning_box

    return lightning_box


def fit(lightning_box, epochs: int, out, resume=None):
    model = lightning_box.BoxProjection(lr=1e-2)
    lightning_box.trainer(epochs, str(out), progress=False).fit(model, lightning_box.data(64, 32), ckpt_path=resume)
    return model


def test_resume_from_a_checkpoint_continues_exactly(tmp_path, lightning_box):
    straight = fit(lightning_box, 4, tmp_path / "straight")
    first = fit(lightning_box, 2, tmp_path / "interrupted")
    saved = {k: v.clone() for k, v in first.layer.state_dict().items()}
    ckpt = tmp_path / "interrupted" / "last.ckpt"
    restored = lightning_box.BoxProjection.load_from_checkpoint(str(ckpt))
    for k, v in restored.layer.state_dict().items():
        assert torch.equal(v, saved[k]), k  # the checkpoint restores the layer exactly
    resumed = fit(lightning_box, 4, tmp_path / "interrupted", resume=str(ckpt))
    for (k, a), (_, b) in zip(straight.layer.state_dict().items(), resumed.layer.state_dict().items()):
        assert torch.equal(a, b), k
    assert not torch.equal(saved["fc1.weight"], resumed.layer.fc1.weight.detach())  # it did train on
