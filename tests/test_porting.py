"""A PyTorch script ports by renaming its imports: the training loop of the MedMNIST 2D
experiment (MedMNIST/experiments, ``MedMNIST2D/train_and_eval_pytorch.py`` with its
``models.py`` ResNet-18 for 28x28 images: kuangliu's CIFAR ResNet with 3x3 stem, cross-entropy,
Adam, MultiStepLR at 50% and 75% of the epochs, a train loop and an evaluation loop) written
once below, in PyTorch's idioms, and run twice: with ``torch`` and with ``cnnfast`` as the
framework. Only the framework module and the data loading differ. One epoch on small synthetic
data from the same initial weights: the loss curve, the evaluation scores and the final weights
agree within float32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cnnfast  # noqa: E402


def medmnist_2d(torch, nn, F, optim):  # noqa: N803 - the framework's own names
    """The experiment's model and loops against the framework given (torch or cnnfast)."""

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, in_planes, planes, stride=1):
            super().__init__()
            self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1,
                                   bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1,
                                   bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.shortcut = nn.Sequential()
            if stride != 1 or in_planes != self.expansion * planes:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride,
                              bias=False),
                    nn.BatchNorm2d(self.expansion * planes))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += self.shortcut(x)
            return F.relu(out)

    class ResNet(nn.Module):
        def __init__(self, block, num_blocks, in_channels=1, num_classes=2, width=64):
            super().__init__()
            self.in_planes = width
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1,
                                   bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.layer1 = self._make_layer(block, width, num_blocks[0], stride=1)
            self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], stride=2)
            self.layer3 = self._make_layer(block, 4 * width, num_blocks[2], stride=2)
            self.layer4 = self._make_layer(block, 8 * width, num_blocks[3], stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.linear = nn.Linear(8 * width * block.expansion, num_classes)

        def _make_layer(self, block, planes, num_blocks, stride):
            layers = []
            for s in [stride] + [1] * (num_blocks - 1):
                layers.append(block(self.in_planes, planes, s))
                self.in_planes = planes * block.expansion
            return nn.Sequential(*layers)

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
            out = self.avgpool(out)
            out = out.view(out.size(0), -1)
            return self.linear(out)

    def resnet18(in_channels, num_classes, width):
        return ResNet(BasicBlock, [2, 2, 2, 2], in_channels, num_classes, width)

    def train(model, train_loader, criterion, optimizer, device):
        model.train()
        losses = []
        for inputs, targets in train_loader:
            optimizer.zero_grad()
            outputs = model(inputs.to(device))
            targets = torch.squeeze(targets, 1).long().to(device)
            loss = criterion(outputs, targets)
            losses.append(loss.item())
            loss.backward()
            optimizer.step()
        return losses

    def test(model, data_loader, criterion, device):
        model.eval()
        losses, scores = [], []
        with torch.no_grad():
            for inputs, targets in data_loader:
                outputs = model(inputs.to(device))
                targets = torch.squeeze(targets, 1).long().to(device)
                losses.append(criterion(outputs, targets).item())
                scores.append(nn.Softmax(dim=1)(outputs))
        return sum(losses) / len(losses), torch.cat(scores, 0).detach().cpu().numpy()

    def run(model, train_loader, test_loader, epochs, lr, device="cpu"):
        criterion = nn.CrossEntropyLoss()
        optimizer = optim.Adam(model.parameters(), lr=lr)
        milestones = [int(0.5 * epochs), int(0.75 * epochs)]
        scheduler = optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        curve = []
        for _ in range(epochs):
            curve += train(model, train_loader, criterion, optimizer, device)
            scheduler.step()
        return curve, test(model, test_loader, criterion, device)

    return resnet18, run


def _batches(framework, x, y, batch_size):
    """The data loading: (images, labels (N, 1)) batches as the framework's tensors."""
    as_tensor = torch.from_numpy if framework is torch else cnnfast.tensor
    return [(as_tensor(x[i:i + batch_size]), as_tensor(y[i:i + batch_size]))
            for i in range(0, len(x), batch_size)]


@pytest.mark.torch
def test_the_medmnist_2d_experiment_ports_by_renaming_its_imports():
    rng = np.random.default_rng(21)
    classes, width = 3, 16  # the experiment's ResNet-18 at a quarter of its width: CI time
    x_train = rng.standard_normal((48, 1, 28, 28)).astype(np.float32)
    y_train = rng.integers(0, classes, (48, 1)).astype(np.int64)
    x_test = rng.standard_normal((16, 1, 28, 28)).astype(np.float32)
    y_test = rng.integers(0, classes, (16, 1)).astype(np.int64)

    torch.manual_seed(0)
    t_build, t_run = medmnist_2d(torch, torch.nn, torch.nn.functional, torch.optim)
    t_model = t_build(1, classes, width)
    c_build, c_run = medmnist_2d(cnnfast, cnnfast.nn, cnnfast.functional, cnnfast.optim)
    c_model = c_build(1, classes, width)
    initial = {k: v.numpy() for k, v in t_model.state_dict().items()
               if not k.endswith("num_batches_tracked")}
    assert set(initial) == set(c_model.state_dict())
    c_model.load_state_dict(initial)

    t_curve, (t_loss, t_scores) = t_run(t_model, _batches(torch, x_train, y_train, 16),
                                        _batches(torch, x_test, y_test, 8), 1, 1e-3)
    c_curve, (c_loss, c_scores) = c_run(c_model, _batches(cnnfast, x_train, y_train, 16),
                                        _batches(cnnfast, x_test, y_test, 8), 1, 1e-3)
    # measured (2026-12-04): curve 7e-6 relative, scores 2e-7, weights 3.4e-5 apart
    np.testing.assert_allclose(c_curve, t_curve, rtol=5e-5)
    np.testing.assert_allclose(c_loss, t_loss, rtol=5e-5)
    np.testing.assert_allclose(c_scores, t_scores, atol=1e-5)
    final = c_model.state_dict()
    for name, value in t_model.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            # Adam's step is about lr wherever a gradient is nonzero, whatever its size, so
            # float32 rounding of tiny gradients shows more in the weights than in the loss
            np.testing.assert_allclose(final[name], value.numpy(), rtol=1e-3, atol=3e-4,
                                       err_msg=name)
