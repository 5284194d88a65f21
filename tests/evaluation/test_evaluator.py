"""inference_on_dataset and DatasetEvaluators."""
import pytest
import torch
from torch import nn

from segkit.evaluation import DatasetEvaluator, DatasetEvaluators, inference_on_dataset


class _Recorder(DatasetEvaluator):
    def __init__(self, task="rec"):
        self.task, self.resets, self.seen = task, 0, []

    def reset(self):
        self.resets += 1
        self.seen = []

    def process(self, inputs, outputs):
        self.seen += [(i["image_id"], o["id"]) for i, o in zip(inputs, outputs)]

    def evaluate(self):
        return {self.task: {"n": len(self.seen)}}


class _Model(nn.Module):
    """Echo model that records the mode and grad state it was called in."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.calls = []

    def forward(self, batch):
        self.calls.append((self.training, torch.is_grad_enabled(), len(batch)))
        return [{"id": inp["image_id"] * 10, "y": self.w * 2} for inp in batch]


def _loader(n, batch):
    ids = list(range(n))
    return [[{"image_id": i} for i in ids[s:s + batch]] for s in range(0, n, batch)]


def test_inference_eval_mode_no_grad_and_restores_training():
    model, ev = _Model(), _Recorder()
    model.train()
    res = inference_on_dataset(model, _loader(5, 2), ev)
    assert res == {"rec": {"n": 5}}
    assert ev.resets == 1
    assert ev.seen == [(i, 10 * i) for i in range(5)]
    assert [c[:2] for c in model.calls] == [(False, False)] * 3
    assert model.training  # restored
    model.eval()
    inference_on_dataset(model, _loader(2, 2), ev)
    assert not model.training  # an eval-mode model stays in eval mode


def test_inference_restores_mode_after_error():
    class Boom(_Model):
        def forward(self, batch):
            raise RuntimeError("boom")

    model = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        inference_on_dataset(model, _loader(2, 1), _Recorder())
    assert model.training


def test_max_images_cuts_the_last_batch():
    model, ev = _Model(), _Recorder()
    assert inference_on_dataset(model, _loader(10, 4), ev, max_images=6) == {"rec": {"n": 6}}
    assert [c[2] for c in model.calls] == [4, 2]  # second batch cut to 2, third never run
    with pytest.raises(ValueError, match="max_images"):
        inference_on_dataset(model, _loader(2, 1), ev, max_images=0)


def test_no_evaluator_and_plain_callable():
    seen = []
    out = inference_on_dataset(lambda b: seen.extend(b) or [{}] * len(b), iter(_loader(3, 2)),
                               None)
    assert out == {} and len(seen) == 3


def test_dataset_evaluators_merge_and_clash():
    a, b = _Recorder("a"), _Recorder("b")
    res = inference_on_dataset(_Model(), _loader(3, 3), DatasetEvaluators([a, b]))
    assert res == {"a": {"n": 3}, "b": {"n": 3}} and a.resets == b.resets == 1
    with pytest.raises(KeyError, match="same task 'a'"):
        inference_on_dataset(_Model(), _loader(1, 1), DatasetEvaluators([a, _Recorder("a")]))


def test_no_progress_bar_noise_off_a_terminal(capsys):
    """Batch jobs and CI logs (stderr not a terminal) get no carriage-return bar updates."""
    inference_on_dataset(_Model(), _loader(4, 1), _Recorder())
    assert capsys.readouterr().err == ""
