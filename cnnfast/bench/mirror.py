"""The PyTorch mirror of a cnnfast model: the same layers, names and forward, in torch.nn."""

from __future__ import annotations


def torch_mirror(model):
    """A PyTorch module computing what the cnnfast ``model`` computes, with the same names.

    Standard layers map to their torch.nn twins; any other module becomes a torch module holding
    the converted children and running the cnnfast class's own ``forward`` (which works when it
    only calls its submodules and tensor methods). Weights are not copied (see ``load``).
    """
    import torch

    from cnnfast import nn

    tnn = torch.nn

    def convert(m):
        if isinstance(m, nn.Sequential):
            from collections import OrderedDict
            return tnn.Sequential(OrderedDict((k, convert(c)) for k, c in m._modules.items()))
        for cls, tcls in ((nn.Conv2d, tnn.Conv2d), (nn.Conv3d, tnn.Conv3d)):
            if isinstance(m, cls):
                return tcls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                            m.dilation, m.groups, bias=m.bias is not None)
        for cls, tcls in ((nn.BatchNorm2d, tnn.BatchNorm2d), (nn.BatchNorm3d, tnn.BatchNorm3d)):
            if isinstance(m, cls):
                return tcls(m.num_features, m.eps, m.momentum, affine=m.weight is not None,
                            track_running_stats=m.running_mean is not None)
        for cls, tcls in ((nn.MaxPool2d, tnn.MaxPool2d), (nn.MaxPool3d, tnn.MaxPool3d),
                          (nn.AvgPool2d, tnn.AvgPool2d), (nn.AvgPool3d, tnn.AvgPool3d)):
            if isinstance(m, cls):
                return tcls(m.kernel_size, m.stride, m.padding)
        if isinstance(m, nn.AdaptiveAvgPool3d):
            return tnn.AdaptiveAvgPool3d(m.output_size)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return tnn.AdaptiveAvgPool2d(m.output_size)
        if isinstance(m, nn.Linear):
            return tnn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        if isinstance(m, nn.Flatten):
            return tnn.Flatten(m.start_dim, m.end_dim)
        if isinstance(m, nn.Dropout):
            return tnn.Dropout(m.p)
        simple = {nn.ReLU: tnn.ReLU, nn.Sigmoid: tnn.Sigmoid, nn.Identity: tnn.Identity}
        for cls, tcls in simple.items():
            if type(m) is cls:
                return tcls()
        shim_cls = type(f"Torch{type(m).__name__}", (tnn.Module,), {"forward": type(m).forward})
        shim = shim_cls()
        for name, value in vars(m).items():
            if name.startswith("_") or name == "training":
                continue
            if name in m._modules or name in m._parameters or name in m._buffers:
                continue
            if value is None or isinstance(value, (bool, int, float, str, tuple)):
                setattr(shim, name, value)
        for name, child in m._modules.items():
            shim.add_module(name, None if child is None else convert(child))
        for name, p in m._parameters.items():
            shim.register_parameter(name, None if p is None else
                                    tnn.Parameter(torch.zeros(p.shape, dtype=torch.float32)))
        for name, b in m._buffers.items():
            shim.register_buffer(name, None if b is None else torch.zeros(b.shape))
        return shim

    return convert(model)


def _set_dropout(model, p: float | None, saved: dict | None = None) -> dict:
    """Set every dropout's p (both libraries name it ``p``); return the previous values."""
    saved = {} if saved is None else saved
    previous = {}
    for name, m in model.named_modules():
        if type(m).__name__ == "Dropout":
            previous[name] = m.p
            m.p = saved.get(name, p) if p is None else p
    return previous

