"""The evaluation PGD of docs/method_lolip.md §3, on the shared ``attacks.pgd``.

One uniform random start in the ball, 10 steps of 2 eps / 10 on the mean cross-entropy (sign
steps for L-infinity, normalised-gradient steps for L2), projection to the ball, clip to [0, 1].
Run it with the model in eval mode.
"""
import attacks

STEPS = 10


def pgd_attack(model, x, y, eps, norm):
    """Adversarial inputs for (x, y)."""
    return attacks.pgd(model, x, y, eps, norm=norm, steps=STEPS, step_size=2 * eps / STEPS,
                       random_start='uniform', order='project_clip', reduction='mean')
