"""The multi-targeted attack of docs/method_lolip.md §3, on the shared ``attacks.multitarget_pgd``.

A targeted PGD towards every class j (20 steps of eps/10, uniform random start); per example the
j != y with the best score p_j(x_adv_j) - p_y(x) is kept. Run it with the model in eval mode.
"""
import attacks

STEPS = 20


def multitarget_attack(model, x, y, eps, norm, num_classes):
    """Adversarial inputs for (x, y)."""
    return attacks.multitarget_pgd(model, x, y, eps, norm=norm, steps=STEPS, step_size=eps / 10,
                                   num_classes=num_classes, random_start='uniform')
