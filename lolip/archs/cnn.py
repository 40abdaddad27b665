"""The two small MNIST networks (docs/method_lolip.md §6)."""
import torch.nn as nn


def cnn001(num_classes, in_channels=1):
    """conv 32 3x3, ReLU, conv 64 3x3 (no ReLU), max-pool 2, dropout .25, fc 9216-128, ReLU,
    dropout .5, fc 128-C (28x28 inputs). The first dropout drops whole channels, as the
    original's Dropout2d does on the pooled feature maps."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(),
        nn.Conv2d(32, 64, 3), nn.MaxPool2d(2), nn.Dropout2d(0.25), nn.Flatten(),
        nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, num_classes))


def cnn002(num_classes, in_channels=1):
    """The TRADES small CNN: conv 32, 32, pool, conv 64, 64, pool (3x3, ReLU); fc 1024-200, ReLU,
    dropout .5, fc 200-200, ReLU, fc 200-C. Kaiming-initialised convs, zero last layer."""
    model = nn.Sequential(
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(1024, 200), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, num_classes))
    for module in model:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.zeros_(model[-1].weight)
    nn.init.zeros_(model[-1].bias)
    return model
