"""The ready tasks: every backbone builds and trains a step; the data modules split and fail clearly."""

from __future__ import annotations

from collections import Counter

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_adaptive_lr import MoMo
from lightning_adaptive_lr.tasks import (
    BACKBONES,
    CIFAR10DataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    FakeDataModule,
    ImageClassifier,
    MNISTDataModule,
    build_backbone,
)

# Small models on a shared 2-core machine: one intra-op thread avoids spin-waiting.
pytestmark = pytest.mark.usefixtures("one_thread")


def quiet_trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


# The smallest input each backbone takes (VGG pools five times; LeNet-5 needs 12×12).
BACKBONE_INPUTS = {
    "mlp": (1, 8, 8),
    "lenet5": (1, 12, 12),
    "small_cnn": (3, 8, 8),
    "resnet20": (3, 8, 8),
    "resnet18": (3, 8, 8),
    "resnet34": (3, 8, 8),
    "vgg16_bn": (3, 32, 32),
    "shufflenet_v2": (3, 8, 8),
}


def test_every_backbone_is_covered():
    assert set(BACKBONE_INPUTS) == set(BACKBONES)


@pytest.mark.parametrize("backbone", sorted(BACKBONE_INPUTS))
def test_backbone_forward_backward_on_fake_data(backbone):
    shape = BACKBONE_INPUTS[backbone]
    data = FakeDataModule(input_shape=shape, num_classes=3, train_size=2, val_size=1, test_size=1, batch_size=2)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    model = ImageClassifier.for_datamodule(data, backbone)
    logits = model(x)
    assert logits.shape == (2, 3)
    loss = nn.functional.cross_entropy(logits, y)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_mlp_widths_follow_hidden_sizes():
    """QLAB's MNIST network: 784 inputs, hidden 1024-1000-1000, 10 outputs."""
    net = build_backbone("mlp", (1, 28, 28), 10, hidden_sizes=(1024, 1000, 1000))
    shapes = [tuple(m.weight.shape) for m in net.modules() if isinstance(m, nn.Linear)]
    assert shapes == [(1024, 784), (1000, 1024), (1000, 1000), (10, 1000)]


def test_resnet20_is_he_et_al_cifar_resnet():
    """19 convolutions + 1 linear layer = 20 weighted layers, about 0.27M parameters (He et al. 2016)."""
    net = build_backbone("resnet20", (3, 32, 32), 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 20
    assert all(c.kernel_size == (3, 3) for c in convs)  # option A shortcuts: no 1×1 projections
    n_params = sum(p.numel() for p in net.parameters())
    assert 0.26e6 < n_params < 0.28e6


@pytest.mark.parametrize("depth_name", ["resnet18", "resnet34"])
def test_torchvision_resnet_has_cifar_stem(depth_name):
    net = build_backbone(depth_name, (3, 32, 32), 10)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    # With the CIFAR stem the last stage sees 4×4 maps (ImageNet stem: 1×1).
    seen = {}

    def record(module, inputs, output):
        seen["shape"] = output.shape

    net.layer4.register_forward_hook(record)
    net.eval()
    with torch.no_grad():
        net(torch.zeros(1, 3, 32, 32))
    assert seen["shape"][-2:] == (4, 4)


def test_vgg16_bn_layout():
    net = build_backbone("vgg16_bn", (3, 32, 32), 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 13 and len(norms) == 13
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    # torchvision's vgg16_bn has 14.7M parameters in its convolutional part; the CIFAR head adds 5130.
    assert abs(sum(p.numel() for p in net.parameters()) - (14_723_136 + 5_130)) == 0


def test_grey_images_reach_torchvision_backbones():
    for name in ("resnet18", "shufflenet_v2"):
        net = build_backbone(name, (1, 16, 16), 4)
        net.eval()
        assert net(torch.zeros(2, 1, 16, 16)).shape == (2, 4)


def test_bad_backbone_arguments_raise_value_error():
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        build_backbone("nope", (1, 8, 8), 10)
    with pytest.raises(ValueError, match=r"'lenet5' cannot take inputs of shape \(1, 8, 8\)"):
        build_backbone("lenet5", (1, 8, 8), 10)
    with pytest.raises(ValueError, match=r"'vgg16_bn' cannot take inputs of shape \(3, 16, 16\)"):
        build_backbone("vgg16_bn", (3, 16, 16), 10)
    with pytest.raises(ValueError, match="image inputs"):
        build_backbone("resnet20", (64,), 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_backbone("mlp", (64,), 1)


# --------------------------------------------------------------------------- the LightningModule


def test_classifier_trains_and_logs_on_digits():
    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=64)
    model = ImageClassifier.for_datamodule(data, "mlp", hidden_sizes=(32,))
    trainer = quiet_trainer(max_epochs=2, log_every_n_steps=1)
    trainer.fit(model, datamodule=data)
    assert isinstance(trainer.optimizers[0], MoMo)  # the default when nothing is configured
    metrics = trainer.callback_metrics
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert key in metrics and torch.isfinite(metrics[key])
    trainer.test(model, datamodule=data, verbose=False)
    assert 0.0 <= float(trainer.callback_metrics["test_acc"]) <= 1.0
    # Two epochs of MoMo on 1258 digits already beat chance (0.1) by far.
    assert float(trainer.callback_metrics["test_acc"]) > 0.5


def test_probe_loss_leaves_metrics_alone():
    data = DigitsDataModule()
    data.setup("fit")
    model = ImageClassifier.for_datamodule(data, "mlp")
    batch = next(iter(data.train_dataloader()))
    loss = model.adaptive_lr_loss(batch)
    assert torch.allclose(loss, nn.functional.cross_entropy(model(batch[0]), batch[1]))
    assert model.train_acc.update_count == 0


def test_classifier_rejects_data_of_another_shape():
    data = FakeDataModule(input_shape=(3, 12, 12), num_classes=3, train_size=4, val_size=2, test_size=2, batch_size=2)
    model = ImageClassifier("mlp", num_classes=3, input_shape=(1, 12, 12))
    with pytest.raises(ValueError, match=r"input_shape=\(3, 12, 12\).*input_shape=\(1, 12, 12\)"):
        quiet_trainer(max_steps=1).fit(model, datamodule=data)


def test_checkpoint_reloads_the_same_network(tmp_path):
    data = FakeDataModule(input_shape=(1, 12, 12), num_classes=3, train_size=4, val_size=2, test_size=2, batch_size=2)
    model = ImageClassifier.for_datamodule(data, "lenet5")
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    reloaded = ImageClassifier.load_from_checkpoint(tmp_path / "model.ckpt")
    assert reloaded.input_shape == (1, 12, 12) and reloaded.num_classes == 3
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- data modules


def test_digits_splits_partition_the_dataset():
    from sklearn.datasets import load_digits

    data = DigitsDataModule(val_fraction=0.1, test_fraction=0.2, seed=0)
    data.setup("fit")
    sizes = [len(s) for s in (data.train_set, data.val_set, data.test_set)]
    assert sizes == [1258, 180, 359] and sum(sizes) == 1797
    x_train = data.train_set.tensors[0]
    assert x_train.shape[1:] == (1, 8, 8) == data.input_shape
    # Standardized with the training split's statistics.
    assert abs(float(x_train.mean())) < 1e-5 and abs(float(x_train.std()) - 1.0) < 1e-5
    # Undo the standardization: the three splits together are exactly the 1797 images (a multiset).
    # The 17 grey levels 0..16 are the only pixel values, so the smallest value is level 0 and
    # consecutive levels are one step apart.
    images, labels = load_digits(return_X_y=True)
    everything = Counter((tuple(int(v) for v in row), int(label)) for row, label in zip(images, labels))
    splits = (data.train_set, data.val_set, data.test_set)
    x_all = torch.cat([s.tensors[0] for s in splits]).reshape(-1, 64)
    y_all = torch.cat([s.tensors[1] for s in splits])
    levels = torch.unique(x_all)
    assert len(levels) == 17
    pixels = torch.round((x_all - levels[0]) / (levels[1] - levels[0])).to(torch.int64)
    assert Counter(zip(map(tuple, pixels.tolist()), y_all.tolist())) == everything
    # Every class appears in every split.
    for split in (data.train_set, data.val_set, data.test_set):
        assert set(split.tensors[1].tolist()) == set(range(10))


def test_digits_split_is_fixed_by_the_seed():
    a, b, c = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for d in (a, b, c):
        d.setup("fit")
    assert torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])
    assert not torch.equal(a.test_set.tensors[1], c.test_set.tensors[1])


def test_digits_flatten_and_loaders():
    data = DigitsDataModule(batch_size=32, flatten=True)
    assert data.input_shape == (64,) and data.num_classes == 10
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (32, 64) and y.dtype == torch.long
    assert sum(len(b[1]) for b in data.test_dataloader()) == 359


def test_bad_digits_fractions():
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="below 1"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.5)


@pytest.mark.parametrize("cls, name", [(MNISTDataModule, "MNIST"), (CIFAR10DataModule, "CIFAR-10")])
def test_missing_dataset_names_the_flag_and_the_path(tmp_path, cls, name):
    data = cls(data_dir=str(tmp_path), download=False)
    data.prepare_data()  # download is off: must not fetch anything
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DatasetNotFoundError) as info:
        data.setup("fit")
    message = str(info.value)
    assert name in message and str(tmp_path.resolve()) in message and "download: true" in message


def test_torchvision_modules_state_their_shapes_without_touching_disk(tmp_path):
    assert MNISTDataModule(data_dir=str(tmp_path)).input_shape == (1, 28, 28)
    assert MNISTDataModule(data_dir=str(tmp_path), flatten=True).input_shape == (784,)
    assert CIFAR10DataModule(data_dir=str(tmp_path)).input_shape == (3, 32, 32)
    assert list(tmp_path.iterdir()) == []


def test_fake_data_shapes_and_disjoint_splits():
    data = FakeDataModule(input_shape=(1, 6, 5), num_classes=4, train_size=6, val_size=3, test_size=2, batch_size=3)
    data.setup("fit")
    assert [len(s) for s in (data.train_set, data.val_set, data.test_set)] == [6, 3, 2]
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (3, 1, 6, 5) and int(y.max()) < 4
    train_first = data.train_set[0][0]
    assert not any(torch.equal(train_first, data.val_set[i][0]) for i in range(3))
    again = FakeDataModule(input_shape=(1, 6, 5), num_classes=4, train_size=6, val_size=3, test_size=2)
    again.setup("fit")
    assert torch.equal(again.train_set[0][0], train_first)


def test_fake_data_rejects_bad_shapes():
    with pytest.raises(ValueError, match="input_shape"):
        FakeDataModule(input_shape=(5, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        FakeDataModule(input_shape=(8, 8))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="train_size"):
        FakeDataModule(train_size=0)


def test_digits_shift_moves_training_images_only():
    data = DigitsDataModule(shift=1, seed=0)
    data.setup()
    plain = DigitsDataModule(seed=0)
    plain.setup()
    image, label = plain.train_set[5]
    padded = nn.functional.pad(image, (1, 1, 1, 1), value=data.train_set.background)
    windows = [padded[:, dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        shifted, shifted_label = data.train_set[5]
        assert shifted_label == label
        seen.add(next(i for i, w in enumerate(windows) if torch.equal(shifted, w)))  # one of the 9 moves
    assert len(seen) > 3  # random moves, not always the same one
    # The blank border is a standardized 0 pixel; validation and test images are not moved.
    assert data.train_set.background == pytest.approx(plain.train_set.tensors[0].min().item())
    assert torch.equal(data.val_set.tensors[0], plain.val_set.tensors[0])
    with pytest.raises(ValueError, match="shift"):
        DigitsDataModule(shift=1, flatten=True)


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_cnn_config_trains_a_few_steps(tmp_path):
    from pathlib import Path

    from lightning_adaptive_lr.cli import AdaptiveLRCLI

    config = Path(__file__).resolve().parents[1] / "configs" / "cnn_digits_momo.yaml"
    cli = AdaptiveLRCLI(args=[
        "fit", "--config", str(config), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "5",
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--test_after_fit", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(tmp_path),
    ])  # fmt: skip
    assert cli.trainer.global_step == 5
    assert cli.datamodule.shift == 1 and any(isinstance(m, nn.BatchNorm2d) for m in cli.model.modules())
    assert type(cli.trainer.optimizers[0]).__name__ == "MoMo"
    assert 0.0 < cli.trainer.callback_metrics["val_loss"].item() < 2.3  # below chance's ln 10 after 5 steps
