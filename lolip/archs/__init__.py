"""Networks by the ARCH names of the --model grammar."""
from .cnn import cnn001, cnn002
from .resnet import resnet
from .wrn import WideResNet

DROPS = {'': 0.0, '_drop20': 0.2, '_drop50': 0.5}


def build_model(arch, num_classes, in_channels):
    """The network called ``arch`` (CNN001, CNN002, WRN_40_10[_dropNN], ResNet50[_dropNN], ResNet152)."""
    if arch == 'CNN001':
        return cnn001(num_classes, in_channels)
    if arch == 'CNN002':
        return cnn002(num_classes, in_channels)
    for base in ('WRN_40_10', 'ResNet50', 'ResNet152'):
        if arch.startswith(base) and arch[len(base):] in DROPS:
            drop = DROPS[arch[len(base):]]
            if base == 'WRN_40_10':
                return WideResNet(num_classes, in_channels, depth=40, widen=10, drop=drop)
            return resnet(base, num_classes, in_channels, drop)
    raise ValueError(f'unknown architecture {arch!r}')
