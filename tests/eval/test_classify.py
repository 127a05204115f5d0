import numpy as np
import pytest
import torch

from diffquant.errors import DiffquantError
from diffquant.eval.classify import class_accuracy, load_classifier, predict_labels


class BrightnessClassifier(torch.nn.Module):
    """Class 1 when the mean input is above 0 (i.e. the image is brighter than mid-grey)."""

    def __init__(self):
        super().__init__()
        self.seen_range = None

    def forward(self, x):
        self.seen_range = (float(x.min()), float(x.max()), tuple(x.shape[1:]))
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([-m, m], dim=1)


def test_accuracy_and_input_convention():
    images = np.zeros((10, 28, 28), np.uint8)
    images[5:] = 255
    labels = np.array([0] * 5 + [1] * 4 + [0])
    clf = BrightnessClassifier()
    r = class_accuracy(images, labels, clf, batch_size=3)
    assert r["accuracy"] == pytest.approx(0.9)
    assert r["per_class"] == {0: pytest.approx(5 / 6), 1: 1.0}
    assert r["n"] == 10
    assert clf.seen_range[:2] == (1.0, 1.0)  # last batch: one white image -> +1
    np.testing.assert_array_equal(predict_labels(images, clf), [0] * 5 + [1] * 5)
    clf(torch.full((1, 1, 28, 28), -1.0))


def test_input_range_minus_one_to_one():
    clf = BrightnessClassifier()
    images = np.array([np.zeros((28, 28)), np.full((28, 28), 255)], np.uint8)
    predict_labels(images, clf)
    assert clf.seen_range == (-1.0, 1.0, (1, 28, 28))


def test_bad_inputs(tmp_path):
    clf = BrightnessClassifier()
    with pytest.raises(DiffquantError, match="labels"):
        class_accuracy(np.zeros((3, 28, 28), np.uint8), [0, 1], clf)
    with pytest.raises(DiffquantError, match="grey"):
        predict_labels(np.zeros((3, 3, 28, 28), np.uint8), clf)
    with pytest.raises(DiffquantError, match="uint8"):
        predict_labels(np.zeros((3, 28, 28), np.float32), clf)
    with pytest.raises(DiffquantError, match="classifier"):
        load_classifier(str(tmp_path / "missing.pt"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script
def test_load_torchscript_and_exported_classifiers(tmp_path):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).eval()
    images = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    expected = predict_labels(images, net)
    scripted = tmp_path / "clf.pt"
    torch.jit.script(net).save(str(scripted))
    exported = tmp_path / "clf.pt2"
    torch.export.save(torch.export.export(
        net, (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: torch.export.Dim("batch")},)), str(exported))
    for path in (scripted, exported):
        np.testing.assert_array_equal(predict_labels(images, load_classifier(str(path))), expected)
