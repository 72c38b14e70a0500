"""FedFomo's mixing weights: how much a received model lowers the receiver's validation loss.

FedFomo (Zhang, Sapra, Fidler, Yeung, Alvarez, "Personalized Federated Learning with First
Order Model Optimization", ICLR 2021, arXiv:2012.08565) weighs each model ``theta_j`` a client i
downloads by the first-order estimate of the descent it offers on i's validation loss ``L_i``,
from i's current model ``theta_i``:

    ``w_ij = max(0, (L_i(theta_i) - L_i(theta_j)) / ||theta_j - theta_i||)``,

normalises the positive ones to sum to 1, and steps
``theta_i <- theta_i + sum_j w_ij (theta_j - theta_i)``, which is the weighted mean
``sum_j w_ij theta_j`` (self weight 0); when no ``w_ij`` is positive it keeps ``theta_i``
(self weight 1). So the result is always a row of mixing weights, like every weighted rule's.

In fedtorrent's round (train, then mix) ``theta_i`` is the receiver's own trained vector, the
state it shared and is about to mix: the model a FedFomo client uploaded and downloads against
in its next round. Its own column is no candidate: ``theta_j = theta_i`` gives ``0 / 0``, and
the paper's step assigns it nothing either. What :func:`fedtorrent.mixing.round.mix_round` does
around this formula (one validation batch, which models are candidates) is documented there and
in ``docs/algorithm.md``.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def fomo_weights(
    own_loss: Tensor, losses: Tensor, distances: Tensor, candidates: Tensor, is_self: Tensor
) -> Tensor:
    """FedFomo's row-stochastic weights ``(R, M)`` (float32) from validation losses.

    Args:
        own_loss: ``(R,)`` each receiver's validation loss of its own vector ``L_i(theta_i)``.
        losses: ``(R, M)`` ``L_i(theta_j)`` on the same batch (read only where ``candidates``).
        distances: ``(R, M)`` ``||theta_j - theta_i||`` (read only where ``candidates``).
        candidates: ``(R, M)`` bool, the received models a receiver may move towards (never its
            own column).
        is_self: ``(R, M)`` bool, each receiver's own column.

    Returns:
        Weights ``max(0, gain / distance)`` normalised over each row's candidates, computed in
        float64 (finite for any finite float32 losses and distances); a row where no candidate
        has a positive weight is one-hot on its own column. A candidate whose loss or distance
        is not finite, or whose distance is 0, gets 0. A receiver whose own loss is not finite
        takes every finite candidate as an improvement of equal size (the limit of the formula
        as ``L_i(theta_i)`` grows): weights proportional to ``1 / distance``.
    """
    own = own_loss.detach().to(torch.float64).unsqueeze(1)
    loss = losses.detach().to(torch.float64)
    distance = distances.detach().to(torch.float64)
    gain = torch.where(torch.isfinite(own), own - loss, 1.0)
    usable = (
        candidates
        & ~is_self
        & torch.isfinite(loss)
        & torch.isfinite(distance)
        & (distance > 0)
        & (gain > 0)
    )
    score = torch.where(usable, gain / torch.where(usable, distance, 1.0), 0.0)
    total = score.sum(dim=1, keepdim=True)
    improved = total > 0
    weights = torch.where(improved, score / torch.where(improved, total, 1.0), is_self.double())
    return weights.to(torch.float32)
