"""Empirical defences and the local-Lipschitzness study of Yang et al. 2020 on PyTorch 2.x.

``lolip.main`` is the command line; ``grammar`` parses ``--model``; ``archs`` builds the networks,
``objectives`` the training losses, ``adversaries`` the evaluation attacks (both over the shared
``attacks.py``), ``data`` the data sets and ``report`` the figures of a run.
"""
