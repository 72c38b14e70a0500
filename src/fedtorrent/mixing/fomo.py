"""FedFomo's mixing weights: how much a model lowers the receiver's validation loss, per distance.

FedFomo (M. Zhang, K. Sapra, S. Fidler, S. Yeung, J. M. Alvarez, "Personalized Federated
Learning with First Order Model Optimization", ICLR 2021, arXiv:2012.08565) weighs each model
``theta_j`` client i considers by the first-order estimate of the descent it offers on i's
validation loss ``L_i`` from i's reference model ``theta_i^{t-1}``:

    ``w_ij = max(0, (L_i(theta_i^{t-1}) - L_i(theta_j)) / ||theta_j - theta_i^{t-1}||)``,

normalises the positive ones to sum to 1 and steps
``theta_i^t = theta_i^{t-1} + sum_j w_ij (theta_j - theta_i^{t-1})``. With weights that sum
to 1 that step is the weighted mean ``sum_j w_ij theta_j``, so FedFomo is a row of mixing
weights like every weighted rule's. The candidates include the client's own freshly trained
model (the official code's default: ``get_federating_clients`` starts from ``[self]``, and the
reference is the model before local training, ``first_model``); fedtorrent does the same (see
:func:`fedtorrent.mixing.round.fit_fomo`). When no weight is positive, FedFomo keeps the
reference; fedtorrent keeps the own *trained* vector instead (self weight 1), as every other
rule would, so no round's training is thrown away and the result stays a mix of the round's
vectors.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def fomo_weights(
    reference_loss: Tensor,
    losses: Tensor,
    distances: Tensor,
    candidates: Tensor,
    is_self: Tensor,
) -> Tensor:
    """FedFomo's row-stochastic weights ``(R, M)`` (float32) from validation losses.

    Args:
        reference_loss: ``(R,)`` each receiver's validation loss ``L_i(theta_i^{t-1})`` of
            its reference vector.
        losses: ``(R, M)`` ``L_i(theta_j)`` on the same batch (read only where ``candidates``);
            the own column holds the receiver's own trained vector's loss.
        distances: ``(R, M)`` ``||theta_j - theta_i^{t-1}||`` (read only where ``candidates``).
        candidates: ``(R, M)`` bool, the vectors a receiver may move towards (its own column
            may be one).
        is_self: ``(R, M)`` bool, each receiver's own column.

    Returns:
        Weights ``max(0, gain / distance)`` normalised over each row's candidates, computed in
        float64 (finite for any finite float32 losses and distances); a row where no candidate
        has a positive weight is one-hot on its own column. A candidate whose loss or distance
        is not finite, or whose distance is 0, gets 0. A receiver whose reference loss is not
        finite takes every finite candidate as an improvement of equal size (the limit of the
        formula as that loss grows): weights proportional to ``1 / distance``.
    """
    reference = reference_loss.detach().to(torch.float64).unsqueeze(1)
    loss = losses.detach().to(torch.float64)
    distance = distances.detach().to(torch.float64)
    gain = torch.where(torch.isfinite(reference), reference - loss, 1.0)
    usable = (
        candidates & torch.isfinite(loss) & torch.isfinite(distance) & (distance > 0) & (gain > 0)
    )
    score = torch.where(usable, gain / torch.where(usable, distance, 1.0), 0.0)
    total = score.sum(dim=1, keepdim=True)
    improved = total > 0
    weights = torch.where(improved, score / torch.where(improved, total, 1.0), is_self.double())
    return weights.to(torch.float32)
