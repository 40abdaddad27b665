"""ResNet50/152: torchvision's networks (7x7 stride-2 stem, max-pool, adaptive average pool).

Adapted as the original: the stem takes ``in_channels`` channels, the classifier ``num_classes``
outputs, and ``_drop20``/``_drop50`` put dropout before the last 1x1 conv of every bottleneck
except the first of each stage. The adaptive pool lets it take any input size (64x64 here).
"""
import torch.nn as nn
from torchvision.models import resnet50, resnet152

BUILDERS = {'ResNet50': resnet50, 'ResNet152': resnet152}


def resnet(depth_name, num_classes, in_channels=3, drop=0.0):
    """torchvision's ``resnet50``/``resnet152`` (no pretrained weights), adapted as above."""
    model = BUILDERS[depth_name](weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode='fan_out', nonlinearity='relu')
    if drop > 0:
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            for block in list(stage)[1:]:
                block.conv3 = nn.Sequential(nn.Dropout(drop), block.conv3)
    return model
