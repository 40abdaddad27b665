"""Pre-activation wide ResNet WRN-40-10 (docs/method_lolip.md §6).

Widths 16/160/320/640, 6 blocks per stage, strides 1/2/2; each block is BN-ReLU-conv3x3-BN-ReLU-
(dropout)-conv3x3 plus the identity (or a 1x1 conv where the width or stride changes).
The final average pool is adaptive (the original's 8x8 pool on 32x32 inputs, the same numbers).
"""
import math

import torch.nn as nn
import torch.nn.functional as F


class PreActBlock(nn.Module):
    def __init__(self, in_planes, planes, stride, drop):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.drop = drop
        self.shortcut = (None if in_planes == planes and stride == 1
                         else nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(activated)))
        out = F.dropout(out, p=self.drop, training=self.training)
        # the original feeds the activated input to the 1x1 shortcut, the raw input to the identity
        shortcut = x if self.shortcut is None else self.shortcut(activated)
        return shortcut + self.conv2(out)


class WideResNet(nn.Module):
    def __init__(self, num_classes, in_channels=3, depth=40, widen=10, drop=0.0):
        super().__init__()
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        stages = []
        for stage, stride in enumerate((1, 2, 2)):
            stages += [PreActBlock(widths[stage] if i == 0 else widths[stage + 1], widths[stage + 1],
                                   stride if i == 0 else 1, drop) for i in range(blocks)]
        self.blocks = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self._init()

    def _init(self):
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan))
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))
