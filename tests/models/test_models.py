"""Model registry: small nets and torchvision families by name, no downloads."""
import pytest
import torch

from trainfleet.models import build_model, list_models
from trainfleet.utils.errors import UsageError


@pytest.mark.parametrize("name, shape, out", [
    ("lenet", (2, 1, 28, 28), (2, 10)),
    ("lenet", (2, 3, 32, 32), (2, 10)),
    ("mlp", (2, 3, 8, 8), (2, 10)),
    ("unet", (2, 3, 16, 16), (2, 4, 16, 16)),
    ("resnet18", (2, 3, 32, 32), (2, 10)),
    ("resnet18", (2, 1, 28, 28), (2, 10)),
    ("densenet121", (1, 3, 32, 32), (1, 10)),
])
def test_builds_and_runs(name, shape, out):
    model = build_model(name, num_classes=out[1], input_shape=shape[1:])
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(shape)).shape == out


def test_listing_has_small_nets_and_torchvision_families():
    names = list_models()
    for expected in ("lenet", "mlp", "unet", "resnet18", "resnet50", "densenet121", "vit_b_16"):
        assert expected in names


def test_unknown_model():
    with pytest.raises(UsageError, match=r"Unknown model 'resnet19'.*HINT: did you mean 'resnet18'"):
        build_model("resnet19")


def test_no_weights_are_downloaded_by_default(monkeypatch):
    """Every way torchvision fetches weights refuses here; a registry model builds without calling
    any of them (randomly initialised: two seeds, two models), while asking torchvision itself for
    its weights does call one: the patches sit where torchvision looks."""
    import urllib.request

    import torch.hub
    import torchvision.models
    import torchvision.models._api

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for owner, name in ((torch.hub, "load_state_dict_from_url"), (torch.hub, "download_url_to_file"),
                        (torchvision.models._api, "load_state_dict_from_url"), (urllib.request, "urlopen")):
        monkeypatch.setattr(owner, name, refuse)
    torch.manual_seed(0)
    first = build_model("resnet50", num_classes=3)
    torch.manual_seed(1)
    second = build_model("resnet50", num_classes=3)
    assert first.fc.out_features == 3
    assert not torch.equal(first.conv1.weight, second.conv1.weight)
    with pytest.raises(AssertionError, match="a download was attempted"):
        torchvision.models.resnet18(weights="DEFAULT")
