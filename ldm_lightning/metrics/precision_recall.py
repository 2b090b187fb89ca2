"""Improved precision and recall (Kynkäänniemi et al. 2019, sec. 2, eq. 1-3), by torch-fidelity.

Each set's manifold is the union of balls around its features ``phi`` whose radius reaches the
k-th nearest neighbour in the same set: ``f(phi, Phi) = 1 if ||phi - phi'|| <= ||phi' -
NN_k(phi', Phi)|| for some phi' in Phi``. Precision ``= mean_{g} f(g, Phi_real)``: the share of
generated features inside the real manifold (fidelity); recall ``= mean_{r} f(r, Phi_gen)``:
the share of real features inside the generated manifold (coverage).
"""

from __future__ import annotations

from torch import Tensor
from torch_fidelity.metric_prc import (
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
    prc_features_to_metric,
)

__all__ = ["precision_recall"]


def precision_recall(generated: Tensor, real: Tensor, k: int = 3) -> dict[str, float]:
    """``{"precision", "recall"}`` of ``generated [N, D]`` against ``real [M, D]`` features,
    with the k-th nearest neighbour (k = 3 in the paper)."""
    if min(len(generated), len(real)) <= k:
        raise ValueError(
            f"precision/recall with the {k}-th nearest neighbour needs more than {k} real and "
            f"generated images, got {len(real)} and {len(generated)}; draw more or lower "
            "protocol.prc_neighborhood."
        )
    # torch-fidelity's convention: features_1 generated, features_2 real.
    result = prc_features_to_metric(
        generated.float(), real.float(), prc_neighborhood=k, prc_batch_size=10000,
        save_cpu_ram=False, verbose=False,
    )
    return {"precision": result[KEY_METRIC_PRECISION], "recall": result[KEY_METRIC_RECALL]}
