"""Natural training: the batch-summed cross-entropy CE(f(x), y)."""
import torch.nn.functional as F


def natural_loss(model, x, y):
    """(sum_i CE(f(x_i), y_i), logits), model in train mode."""
    model.train()
    logits = model(x)
    return F.cross_entropy(logits, y, reduction='sum'), logits
