"""The maths of subspace descent as plain functions over tensors.

Nothing here keeps state: every function takes the tensors it reads and the tensors it
updates in place, in the style of ``torch.optim.adamw``. The optimizer classes only do the
plumbing (param groups, per-parameter state, orientation).

Conventions. A projected weight's gradient is brought into the *canonical orientation*
``G`` of shape ``m x n`` in which the projector acts on the rows: the projection matrix
``P`` is ``m x r``, the low-rank gradient is ``R = P^T G`` (``r x n``) and an update ``D``
in the subspace goes back as ``P D`` (``m x n``). A weight whose projector acts on its
columns is handled by transposing it into this orientation (see ``osd.optimizer``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "adamw_direction",
    "lion_direction",
    "adafactor_direction",
    "sgd_direction",
    "newton_schulz",
    "muon_direction",
    "transport_matrix",
    "transport_first_moment",
    "transport_second_moment",
    "channel_ratios",
    "limit_norm_growth",
    "fira_update",
    "apollo_update",
    "online_pca_loss",
    "online_pca_grad",
    "svd_basis",
    "eigh_basis",
    "randomized_basis",
    "random_basis",
    "principal_angles",
]


# --------------------------------------------------------------------------------------
# Inner update rules: each returns the direction D; the caller applies W -= lr * D.
# --------------------------------------------------------------------------------------


def adamw_direction(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    beta1: float,
    beta2: float,
    eps: float,
    correct_bias: bool = True,
    hf_eps: bool = False,
) -> Tensor:
    """Adam's direction. ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2`` (in place), then

    - ``hf_eps=False`` (``torch.optim.AdamW``): ``D = (m / c1) / (sqrt(v) / sqrt(c2) + eps)``;
    - ``hf_eps=True`` (Hugging Face's and ``galore_torch``'s AdamW): ``D = sqrt(c2) / c1 * m / (sqrt(v) + eps)``,
      eps added to the raw ``sqrt(v)`` and the bias correction folded into the step size;

    with ``c1 = 1 - b1^t``, ``c2 = 1 - b2^t`` (both 1 if not ``correct_bias``). The two agree at
    ``eps = 0``; otherwise the HF form's effective eps is ``eps / sqrt(c2)``, larger early on.
    ``step`` is t, counted from 1. Weight decay is not part of the direction: it is decoupled
    and applied to the full weight by the caller.
    """
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step if correct_bias else 1.0
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step) if correct_bias else 1.0
    if hf_eps:
        return (exp_avg / exp_avg_sq.sqrt().add_(eps)).mul_(bias_correction2_sqrt / bias_correction1)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    return (exp_avg / bias_correction1).div_(denom)


def lion_direction(
    grad: Tensor, exp_avg: Tensor, beta1: float, beta2: float, apply_sign: bool = True
) -> Tensor:
    """Lion (Chen et al., 2023): ``D = sign(b1 m + (1 - b1) g)``, then ``m <- b2 m + (1 - b2) g``.

    With ``apply_sign=False`` the interpolation ``c = b1 m + (1 - b1) g`` is returned
    unsigned, for the variant that takes the sign after projecting back to full size.
    """
    direction = torch.lerp(grad, exp_avg, beta1)
    exp_avg.lerp_(grad, 1.0 - beta2)
    return direction.sign_() if apply_sign else direction


def adafactor_direction(
    grad: Tensor,
    state: dict[str, Tensor],
    step: int,
    decay_rate: float,
    eps: float,
    clip_threshold: float,
    beta1: float | None,
    prefix: str = "",
) -> Tensor:
    """Adafactor (Shazeer & Stern, 2018) with a factored second moment.

    For a 2-D ``g`` (``a x b``) only a row statistic ``v_row`` (``a``) and a column
    statistic ``v_col`` (``b``) are kept, with ``beta2_t = 1 - t^decay_rate``:

        v_row <- beta2_t v_row + (1 - beta2_t) mean_cols(g^2 + eps)
        v_col <- beta2_t v_col + (1 - beta2_t) mean_rows(g^2 + eps)
        v_hat = v_row v_col^T / mean(v_row)
        U = g / sqrt(v_hat),   U <- U / max(1, RMS(U) / clip_threshold)

    A 1-D ``g`` keeps an unfactored ``v``. With ``beta1`` set, ``U`` is smoothed by an
    exponential moving average (``exp_avg``) before it is returned. The learning rate is
    given explicitly (no relative step sizes, no parameter-scale factor).
    """
    beta2_t = 1.0 - float(step) ** decay_rate
    sq = grad.square().add_(eps)
    if grad.dim() == 2:
        row, col = state[prefix + "exp_avg_sq_row"], state[prefix + "exp_avg_sq_col"]
        row.lerp_(sq.mean(dim=1), 1.0 - beta2_t)
        col.lerp_(sq.mean(dim=0), 1.0 - beta2_t)
        row_factor = (row / row.mean()).rsqrt_().unsqueeze(1)
        col_factor = col.rsqrt().unsqueeze(0)
        update = grad * row_factor * col_factor
    else:
        v = state[prefix + "exp_avg_sq"]
        v.lerp_(sq, 1.0 - beta2_t)
        update = grad * v.rsqrt()
    rms = update.square().mean().sqrt()
    update.div_((rms / clip_threshold).clamp_(min=1.0))
    if beta1 is not None:
        exp_avg = state[prefix + "exp_avg"]
        exp_avg.lerp_(update, 1.0 - beta1)
        update = exp_avg.clone()
    return update


def sgd_direction(grad: Tensor, momentum_buffer: Tensor | None, momentum: float, nesterov: bool) -> Tensor:
    """SGD with heavy-ball momentum, as ``torch.optim.SGD`` (no dampening):
    ``b <- mu b + g``; ``D = b``, or ``g + mu b`` with Nesterov."""
    if momentum_buffer is None:
        return grad.clone()
    momentum_buffer.mul_(momentum).add_(grad)
    if nesterov:
        return grad.add(momentum_buffer, alpha=momentum)
    return momentum_buffer.clone()


# Newton-Schulz coefficients (a, b, c) of the quintic map x -> a x + b x^3 + c x^5 applied to
# the singular values: chosen (Jordan et al., Muon, 2024) to push every value in (0, 1] to
# about [0.7, 1.2] in five iterations, steeply near 0, rather than to converge to exactly 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
MUON_SCALES = ("rms", "spectral")


def newton_schulz(X: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximate orthogonalisation ``U V^T`` of ``X = U S V^T`` (``a x b``), as in Muon.

    ``X`` is divided by its Frobenius norm (so every singular value is at most 1), then
    ``steps`` times ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` (``min x min``: the
    matrix is transposed first when it has more rows than columns). Each iteration maps each
    singular value ``s`` to ``a s + b s^3 + c s^5`` and leaves the singular vectors alone.
    Computed in float32 (the caller's dtype is restored); cost ``O(a b min(a, b))`` per step.
    """
    a, b, c = NS_COEFFICIENTS
    tall = X.shape[-2] > X.shape[-1]
    Y = X.float().mT if tall else X.float()
    Y = Y / (Y.norm() + eps)
    for _ in range(steps):
        A = Y @ Y.mT
        Y = torch.addmm(Y, torch.addmm(A, A, A, beta=b, alpha=c), Y, beta=a)
    return (Y.mT if tall else Y).to(X.dtype)


def muon_direction(grad: Tensor, momentum_buffer: Tensor, momentum: float, nesterov: bool, ns_steps: int, scale: str) -> Tensor:
    """Muon: ``b <- mu b + g`` (in place), ``M = g + mu b`` (Nesterov) or ``b``, then
    ``D = s * newton_schulz(M)``.

    ``D`` has every singular value near ``s``: the update of a matrix ``a x b`` moves all of
    its directions by the same amount. The shape-aware factor ``s``:

    - ``"rms"``: ``0.2 sqrt(max(a, b))``, which gives ``D`` an RMS of about 0.2 (an exactly
      orthogonal ``a x b`` matrix has RMS ``1 / sqrt(max(a, b))``), like a typical AdamW update,
      so AdamW's learning rate and weight decay carry over (Liu et al., "Muon is scalable", 2025);
    - ``"spectral"``: ``sqrt(max(1, a / b))`` (Jordan et al.'s Muon).

    In a subspace the matrix is ``R``'s (``r x n``); ``P D`` then has the same singular values
    as ``D`` for an orthonormal ``P``.
    """
    momentum_buffer.mul_(momentum).add_(grad)
    M = grad.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    rows, cols = grad.shape
    factor = 0.2 * math.sqrt(max(rows, cols)) if scale == "rms" else math.sqrt(max(1.0, rows / cols))
    return newton_schulz(M, ns_steps).mul_(factor)


# --------------------------------------------------------------------------------------
# Moment transport: re-expressing the inner rule's state when P moves.
# --------------------------------------------------------------------------------------


def transport_matrix(P_old: Tensor, P_new: Tensor) -> Tensor:
    """``C`` (``r x r``) that maps coordinates ``R = P_old^T G`` to ``P_new^T G``.

    A state such as Adam's first moment is an average of ``R_t = P^T G_t``. If ``G`` lies in
    ``span(P_old)``, ``G = P_old c`` with ``c = (P_old^T P_old)^{-1} R_old``, so

        R_new = P_new^T G = C R_old,   C = P_new^T P_old (P_old^T P_old)^{-1}.

    For an orthonormal ``P_old`` this is LDAdam's and GoLore's ``P_new^T P_old``; the Gram
    factor makes ``C`` the identity when ``P`` is unchanged and ``Q^T`` when ``P_new = P_old Q``
    (any invertible ``Q``) even if ``P`` has drifted from orthonormality (online PCA keeps it
    only approximately). Cost ``O(m r^2 + r^3)``; computed in float32 at least (float64 for
    float64 inputs), returned in that dtype.
    """
    dtype = torch.promote_types(P_new.dtype, torch.float32)  # at least float32 for the solve
    P_old, P_new = P_old.to(dtype), P_new.to(dtype)
    # C^T = gram^{-1} (P_old^T P_new), gram symmetric positive definite.
    return torch.linalg.solve(P_old.mT @ P_old, P_old.mT @ P_new).mT


def transport_first_moment(state: Tensor, C: Tensor) -> Tensor:
    """``C m`` for a state whose rows are subspace coordinates (``r x n`` or ``r``)."""
    return C @ state


def transport_second_moment(state: Tensor, C: Tensor) -> Tensor:
    """``(C * C) v`` (``C`` squared elementwise) for a per-coordinate second moment ``v``.

    ``v_ij`` estimates ``E[R_ij^2]``. In the new coordinates ``R'_kj = sum_i C_ki R_ij`` and

        E[R'_kj^2] = sum_i C_ki^2 E[R_ij^2] + sum_{i != l} C_ki C_kl E[R_ij R_lj].

    Adam keeps no cross terms, so we take them to be zero (coordinates uncorrelated), which
    leaves ``v' = (C * C) v``: a non-negative combination of non-negative entries, hence never
    negative (the first moment's map ``C v`` could make it so), exact when ``C`` is a signed
    permutation (and so when ``P`` is unchanged), and a weighted mean of the old entries when
    ``P`` rotates within its span (the rows of an orthogonal ``C * C`` sum to 1).
    """
    return C.square() @ state


# --------------------------------------------------------------------------------------
# Off-subspace compensation (Fira, APOLLO).
# --------------------------------------------------------------------------------------


def channel_ratios(direction: Tensor, R: Tensor, granularity: str, eps: float = 1e-8) -> Tensor:
    """How much the inner rule amplified the low-rank gradient ``R`` (``r x n``) into its
    update ``D``: ``||D_:j|| / ||R_:j||`` per column ``j`` (``"channel"``, shape ``1 x n``) or
    ``||D|| / ||R||`` (``"tensor"``, a scalar), ``eps`` added to the denominators."""
    if granularity == "tensor":
        return direction.norm() / (R.norm() + eps)
    return (direction.norm(dim=0) / (R.norm(dim=0) + eps)).unsqueeze(0)


def limit_norm_growth(update: Tensor, previous_norm: Tensor, limit: float | None) -> Tensor:
    """Norm-growth limiter: if ``||S_t|| > limit * ||S_{t-1}||``, rescale ``S_t`` to norm
    ``limit * ||S_{t-1}||`` (``S_t`` in place). ``previous_norm`` (a 0-d tensor, 0 before the
    first step, when nothing is limited) is set to ``||S_t||`` after limiting. ``limit=None``
    only records the norm."""
    norm = update.norm()
    if limit is not None:
        cap = limit * previous_norm
        factor = torch.where((previous_norm > 0) & (norm > cap), cap / norm, torch.ones_like(norm))
        update.mul_(factor.to(update.dtype))
        norm = norm * factor
    previous_norm.copy_(norm)
    return update


def fira_update(P: Tensor, direction: Tensor, G: Tensor, R: Tensor, previous_norm: Tensor, granularity: str, limit: float | None) -> Tensor:
    """Fira (Chen et al., arXiv 2410.01623): the low-rank update plus the part of the
    gradient the projection drops, scaled like the low-rank part was.

        U = P D + limit_norm_growth(phi * (G - P R))

    with ``phi`` from :func:`channel_ratios` (``D`` against ``R``): the residual
    ``G - P P^T G`` gets no optimizer state of its own, it borrows the per-column
    amplification that the inner rule applied in the subspace. The limiter keeps a sudden
    jump of the residual (a loss spike) from being amplified. ``G - P R`` is exactly zero
    when ``P`` spans the whole space (``r = m``, ``P`` orthogonal). Temporaries ``m x n``;
    state: one scalar.
    """
    low_rank = P @ direction
    residual = (G - P @ R).mul_(channel_ratios(direction, R, granularity))
    return low_rank.add_(limit_norm_growth(residual, previous_norm, limit))


def apollo_update(direction: Tensor, G: Tensor, R: Tensor, previous_norm: Tensor, granularity: str, limit: float | None) -> Tensor:
    """APOLLO (Zhu et al., arXiv 2412.05270): the low-rank state only estimates how much to
    scale each channel; the update is the full gradient, scaled.

        U = limit_norm_growth(G * phi)

    with ``phi`` from :func:`channel_ratios` (per column of ``G``, or one scalar for
    APOLLO-Mini's ``"tensor"``). ``P D`` itself is not applied. Temporaries ``m x n``;
    state: one scalar.
    """
    return limit_norm_growth(G * channel_ratios(direction, R, granularity), previous_norm, limit)


# --------------------------------------------------------------------------------------
# Projection rules.
# --------------------------------------------------------------------------------------


def online_pca_loss(P: Tensor, G: Tensor, ortho_reg: float) -> Tensor:
    """The online-PCA loss of Online Subspace Descent (reference form, for checking only):

        L(P) = ||P P^T Gn - Gn||_F^2 + ortho_reg * ||P^T P - I||_F^2,   Gn = G / ||G||_F

    ``P``: ``m x r``, ``G``: ``m x n``. It forms ``m x n`` products; the optimizer uses
    :func:`online_pca_grad` instead.
    """
    Gn = G / G.norm()
    residual = P @ (P.mT @ Gn) - Gn
    gram = P.mT @ P - torch.eye(P.shape[1], dtype=P.dtype, device=P.device)
    return residual.square().sum() + ortho_reg * gram.square().sum()


def online_pca_grad(P: Tensor, G: Tensor, ortho_reg: float, R: Tensor | None = None, grad_norm: Tensor | float | None = None) -> Tensor:
    """Closed-form gradient of :func:`online_pca_loss` with respect to ``P``.

    With ``Z = Gn^T P`` (``n x r``), ``Y = Gn Z`` (``m x r``) and ``A = P^T P`` (``r x r``):

        dL/dP = -4 Y + 2 Y A + 2 P (Z^T Z) + 4 ortho_reg P (A - I)

    Cost O(m n r); no ``m x m`` or ``m x n`` temporaries beyond ``G`` itself. ``R = P^T G``
    (``r x n``) and ``||G||_F`` may be passed when the caller already has them (the
    optimizer step projects the gradient with the same ``P``), which saves one of the two
    large matrix products: ``Z = R^T / ||G||``.
    """
    if grad_norm is None:
        grad_norm = G.norm()
    R = P.mT @ G if R is None else R  # r x n; Z = R^T / ||G||
    Y = (G @ R.mT).mul_(1.0 / grad_norm**2)  # m x r: Gn Z, one scaling of the small product
    A = P.mT @ P
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    # Z^T Z + 2 lambda (A - I), with Z^T Z = P^T Gn Gn^T P = P^T Y: an m r^2 product instead of
    # an n r^2 one. addmm's beta rather than add_(..., alpha=...): torch 2.13's inductor drops
    # alpha when it adds to a matrix product (torch.compile(optimizer.step) would be wrong).
    inner = torch.addmm(A - eye, P.mT, Y, beta=2.0 * ortho_reg)
    # 2 (Y (A - 2 I) + P (Z^T Z + 2 lambda (A - I))): one product with P for both P-terms.
    return torch.addmm(Y @ (A - 2.0 * eye), P, inner).mul_(2.0)


def svd_basis(G: Tensor, rank: int, side: str) -> Tensor:
    """Top-``rank`` singular vectors of ``G`` (``m x n``), computed in float32 (GaLore).

    ``side="left"``: the first ``rank`` columns of ``U`` (``m x rank``); ``side="right"``:
    the first ``rank`` rows of ``V^T``, returned transposed (``n x rank``). The SVD is
    taken of ``G`` as given for both sides, so the singular vectors (signs included) are
    the ones ``galore_torch`` gets.
    """
    U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    basis = U[:, :rank] if side == "left" else Vh[:rank].mT
    return basis.to(G.dtype).contiguous()


def eigh_basis(G: Tensor, rank: int) -> Tensor:
    """The top-``rank`` left singular subspace of ``G`` (``m x n``) as an ``m x rank``
    orthonormal matrix, from the eigendecomposition of ``G G^T`` (``m x m``).

    The same subspace as :func:`svd_basis` (``side="left"``) up to round-off and the signs
    of the vectors, for ``m n^2``-free cost: ``m^2 n`` for the Gram matrix plus ``m^3`` for
    ``eigh``. Use it with ``m <= n`` (the canonical orientation). Computed in float32;
    squaring ``G`` loses the directions whose singular values are below ~1e-4 of the
    largest, which only matters when ``rank`` reaches into that noise floor.
    """
    Gf = G.float()
    _, vectors = torch.linalg.eigh(Gf @ Gf.mT)  # ascending eigenvalues
    return vectors[:, -rank:].flip(1).to(G.dtype).contiguous()


def randomized_basis(G: Tensor, rank: int, niter: int, generator: torch.Generator, oversample: int = 8) -> Tensor:
    """An approximate top-``rank`` left singular subspace of ``G`` (``m x n``) by randomized
    range finding (Halko, Martinsson & Tropp, 2011, algorithms 4.4 and 5.1).

    With ``k = min(rank + oversample, m, n)`` and a Gaussian ``Omega`` (``n x k``) drawn
    from ``generator`` (on the CPU, so every device draws the same one):

        Q = orth(G Omega);  niter times: Q = orth(G colnorm(G^T Q))
        B = Q^T G  (k x n);  U_B = eigenvectors of B B^T  (k x k, descending)
        basis = Q U_B[:, :rank]                (m x rank, orthonormal)

    ``colnorm`` scales each column to unit norm where Halko et al. orthonormalise with a QR:
    ``G colnorm(Z)`` spans what ``G orth(Z)`` spans, the scaling keeps it from over- or
    underflowing with ``||G||^2``, and the ``n x k`` QR it replaces is the dearest step on a
    wide ``G``. Only directions whose singular value is under ``sqrt(eps)`` (3e-4 in
    float32) of the top one lose accuracy, each holding under 1e-7 of the energy; on real
    60m and 1B gradients the energy captured and the median angle are those of the QR
    version (``docs/performance.md``).
    scikit-learn's range finder leaves out the normalisation altogether for up to two
    power iterations.

    Cost ``2 (2 + 2 niter) m n k`` flops in matrix products plus QRs of ``m x k``
    matrices and an ``eigh`` of ``k x k``, against ``O(m n min(m, n))`` for a full
    SVD. (An SVD of the ``k x n`` matrix ``B`` would cost as much as all the rest here.) Each power iteration
    raises the singular values' ratio that separates the subspace to the power ``2 niter + 1``;
    the principal angles to the exact subspace are measured in ``docs/performance.md``.
    """
    m, n = G.shape
    k = min(rank + oversample, m, n)
    Gf = G.float()
    omega = torch.randn(n, k, generator=generator, dtype=torch.float32).to(G.device)
    Q = torch.linalg.qr(Gf @ omega).Q
    for _ in range(niter):
        Z = Gf.mT @ Q
        Q = torch.linalg.qr(Gf @ Z.div_(torch.linalg.vector_norm(Z, dim=0).clamp_min_(torch.finfo(Z.dtype).tiny))).Q
    B = Q.mT @ Gf  # k x n: its left singular vectors from eigh(B B^T), k x k, not an SVD of B
    _, U_small = torch.linalg.eigh(B @ B.mT)  # ascending eigenvalues
    return (Q @ U_small[:, -rank:].flip(1)).to(G.dtype).contiguous()


def random_basis(dim: int, rank: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A ``dim x rank`` matrix drawn uniformly (Haar) from the orthonormal ones (GoLore).

    QR of a standard Gaussian, with the signs of ``R``'s diagonal moved onto ``Q`` so the
    distribution is exactly uniform. Drawn on the CPU from ``generator`` and moved to
    ``device``, so every device and every rank draws the same matrix from the same seed.
    """
    gaussian = torch.randn(dim, rank, generator=generator, dtype=torch.float32)
    Q, R = torch.linalg.qr(gaussian)
    Q.mul_(torch.sign(R.diagonal()).add_(R.diagonal() == 0))
    return Q.to(device=device, dtype=dtype)


def principal_angles(P: Tensor, Q: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between the column spans of ``P`` and ``Q``.

    Both are orthonormalised first, so a ``P`` that has drifted from orthonormality is
    judged by the subspace it spans.
    """
    Qp, _ = torch.linalg.qr(P.double())
    Qq, _ = torch.linalg.qr(Q.double())
    cosines = torch.linalg.svdvals(Qp.mT @ Qq).clamp(-1.0, 1.0)
    return torch.arccos(cosines).flip(0)
