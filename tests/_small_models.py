"""The small classifier and data the closure-protocol tests share (test_fd_protocol.py,
test_curvature_closure.py)."""

import torch
import torch.nn as nn


def mlp(dtype=torch.float64, seed=0, dropout=0.0, batchnorm=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 10)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(10))
    layers += [nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(10, 3)]
    return nn.Sequential(*layers).to(dtype)


def data(dtype=torch.float64, n=24, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen).to(dtype), torch.randint(0, 3, (n,), generator=gen)
