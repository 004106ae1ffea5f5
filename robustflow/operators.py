"""Linear operators ``A`` with an exact adjoint ``Aᵀ`` and exact singular values.

The steps of a network only see this small interface:

* ``op(x)`` applies ``A``; ``op.adjoint(y)`` applies ``Aᵀ`` exactly;
* ``op.singular_value_range()`` returns proven ``(σ_min, σ_max)`` of ``A`` computed in
  float64 from the current weights (dense: SVD; circular convolutions: the 2-D DFT
  block-diagonalisation of Sedghi et al. 2019), never an estimate;
* ``op.export()`` returns the same operator with plain (unparametrised) weights.

Orthogonality comes from geotorch (``geotorch.orthogonal``), so it holds by construction
after every optimiser step, through either of geotorch's maps from skew-symmetric ``S`` to
the orthogonal group (``ORTHOGONAL_MAPS``): the matrix exponential ``e^S`` or the Cayley
transform ``(I − S/2)⁻¹(I + S/2)`` (one LU solve instead of a Padé exponential: cheaper
per training step, same manifold); the bounds are nevertheless computed from the weights as they
are, so a certificate never rests on an assumption.
"""

from __future__ import annotations

from collections.abc import Callable

import geotorch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certify.spectral import (
    circular_conv_singular_values,
    matrix_singular_values,
    singular_value_range,
)

#: geotorch's trivialisations of the orthogonal group (``triv=``), by name.
ORTHOGONAL_MAPS = ("expm", "cayley")


def _orthogonalize(module: nn.Module, name: str, orthogonal_map: str) -> None:
    """Put ``module.<name>`` on geotorch's Stiefel manifold through ``orthogonal_map``."""
    if orthogonal_map not in ORTHOGONAL_MAPS:
        raise ValueError(f"orthogonal_map must be one of {ORTHOGONAL_MAPS}, got {orthogonal_map!r}")
    geotorch.orthogonal(module, name, triv=orthogonal_map)


def _check_input(x: Tensor, expected: tuple[int, ...], who: str) -> None:
    if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"{who} expects input of shape (batch, {', '.join(map(str, expected))}), "
            f"got {tuple(x.shape)}"
        )


def _positive(name: str, value: int) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class LinearOperator(nn.Module):
    """Interface of the operators ``A`` used inside steps (see the module docstring)."""

    #: Shape of one input sample (without batch dimension).
    in_shape: tuple[int, ...]
    #: Shape of one output sample.
    out_shape: tuple[int, ...]

    def adjoint(self, y: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def singular_values(self) -> Tensor:  # pragma: no cover - interface
        """All ``min(m, n)`` singular values of ``A`` (``m`` outputs, ``n`` inputs), float64.

        The contract :meth:`singular_value_range` relies on: when there are fewer values than
        input dimensions, ``A`` has a kernel and ``σ_min`` over the input space is 0.
        """
        raise NotImplementedError

    def sandwich(self, x: Tensor, inner: Callable[[Tensor], Tensor]) -> Tensor:
        """``Aᵀ inner(A x)``, with the weights of ``A`` computed once for both products."""
        return self.adjoint(inner(self(x)))

    def singular_value_range(self) -> tuple[float, float]:
        """Proven ``(σ_min, σ_max)`` of ``A`` on its input space (float64)."""
        values = self.singular_values()
        lo, hi = singular_value_range(values)
        in_dim = int(torch.tensor(self.in_shape).prod())
        if values.numel() < in_dim:  # A has a kernel: σ_min over the input space is 0
            lo = 0.0
        return lo, hi

    def lipschitz_bound(self) -> float:
        return self.singular_value_range()[1]

    def export(self) -> LinearOperator:
        return self


# --------------------------------------------------------------------------- dense


class DenseOperator(LinearOperator):
    """``A x`` for a dense ``out_features × in_features`` matrix.

    ``orthogonal=True`` puts the weight on geotorch's Stiefel manifold: orthonormal
    columns (``AᵀA = I``, an isometry) when ``out ≥ in``, orthonormal rows (``AAᵀ = I``,
    ``‖A‖ = 1``) when ``out < in``.

    >>> A = DenseOperator(4, 6, orthogonal=True)
    >>> torch.allclose(A.weight.T @ A.weight, torch.eye(4), atol=1e-5)
    True
    """

    def __init__(self, in_features: int, out_features: int, *, orthogonal: bool = True,
                 orthogonal_map: str = "expm"):
        super().__init__()
        n, m = _positive("in_features", in_features), _positive("out_features", out_features)
        self.in_shape, self.out_shape = (n,), (m,)
        self.weight = nn.Parameter(torch.empty(m, n))
        nn.init.orthogonal_(self.weight)
        if orthogonal:
            _orthogonalize(self, "weight", orthogonal_map)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_shape, type(self).__name__)
        return x @ self.weight.T

    def adjoint(self, y: Tensor) -> Tensor:
        return y @ self.weight

    def singular_values(self) -> Tensor:
        return matrix_singular_values(self.weight)

    def export(self) -> DenseOperator:
        weight = self.weight.detach()
        plain = DenseOperator(self.in_shape[0], self.out_shape[0], orthogonal=False).to(weight)
        plain.weight.data.copy_(weight)
        return plain


# --------------------------------------------------------------------- convolution


def compose_kernels(a: Tensor, b: Tensor) -> Tensor:
    """Kernel of ``A ∘ B`` for cross-correlation kernels ``a`` and ``b``.

    With ``(A x)[p] = Σ_u a_u x[p + u]``, the composition has taps
    ``(a ∘ b)_w = Σ_{u + v = w} a_u b_v`` (matrix products of the channel blocks).
    """
    ca, cb = a.shape[1], b.shape[0]
    if ca != cb:
        raise ValueError(f"cannot compose kernels with {ca} and {cb} channels")
    kb1, kb2 = b.shape[2], b.shape[3]
    # a full 2-D convolution over the taps, batched over a's output channels
    padded = F.pad(a, (kb2 - 1, kb2 - 1, kb1 - 1, kb1 - 1))
    return F.conv2d(padded, b.transpose(0, 1).flip(2, 3))


class _CircularPad(torch.autograd.Function):
    """``F.pad(mode="circular")``, written as five strip copies into one buffer that keeps the
    input's memory format (``F.pad`` returns channels-first, which makes oneDNN reorder every
    channels-last convolution input); the backward folds the border gradients back onto the
    rows and columns they were copied from (a few strip additions, instead of the full-size
    zero-fill-and-add per slice that autograd would record for concatenated slices)."""

    @staticmethod
    def forward(ctx, x: Tensor, p: int) -> Tensor:
        ctx.p = p
        n, c, h, w = x.shape
        layout = (torch.channels_last if not x.is_contiguous()
                  and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
        out = torch.empty((n, c, h + 2 * p, w + 2 * p), dtype=x.dtype, device=x.device,
                          memory_format=layout)
        out[..., p:-p, p:-p] = x
        out[..., :p, p:-p] = x[..., -p:, :]
        out[..., -p:, p:-p] = x[..., :p, :]
        out[..., :p] = out[..., -2 * p:-p]  # the columns last, corners included
        out[..., -p:] = out[..., p:2 * p]
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        p = ctx.p
        rows = grad[..., p:-p, :].clone()
        rows[..., :p, :] += grad[..., -p:, :]
        rows[..., -p:, :] += grad[..., :p, :]
        folded = rows[..., p:-p].clone()
        folded[..., :p] += rows[..., -p:]
        folded[..., -p:] += rows[..., :p]
        return folded, None


def circular_pad(x: Tensor, p: int) -> Tensor:
    """Wrap the last two dimensions around by ``p`` (``F.pad(mode="circular")``, with the cheap
    backward of :class:`_CircularPad`)."""
    if p == 0:
        return x
    if p > min(x.shape[-2:]):
        raise ValueError(f"cannot wrap a {tuple(x.shape[-2:])} grid around by {p}")
    return _CircularPad.apply(x, p)


class ConvOperator(LinearOperator):
    """Circular convolution ``A x = K ⋆ x`` on a ``size × size`` grid (stride 1, same size).

    Circular padding makes ``A`` block-diagonal under the 2-D DFT, so its singular
    values are exactly those of the per-frequency channel matrices, and ``Aᵀ`` is the
    circular cross-correlation with the kernel flipped in space and transposed in
    channels. Unconstrained: used by the baseline and as the export of
    :class:`OrthogonalConv`.
    """

    def __init__(self, in_channels: int, out_channels: int, size: int, kernel_size: int = 3):
        super().__init__()
        c_in, c_out = _positive("in_channels", in_channels), _positive("out_channels", out_channels)
        size, k = _positive("size", size), _positive("kernel_size", kernel_size)
        if k % 2 == 0:
            raise ValueError(f"kernel_size must be odd so the convolution is centred, got {k}")
        self.in_shape, self.out_shape = (c_in, size, size), (c_out, size, size)
        self.kernel_size = k
        self.weight = nn.Parameter(torch.empty(c_out, c_in, k, k))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def kernel(self) -> Tensor:
        return self.weight

    def _pad(self, x: Tensor) -> Tensor:
        return circular_pad(x, self.kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_shape, type(self).__name__)
        return F.conv2d(self._pad(x), self.kernel())

    def adjoint(self, y: Tensor) -> Tensor:
        return self._adjoint(y, self.kernel())

    def _adjoint(self, y: Tensor, kernel: Tensor) -> Tensor:
        return F.conv2d(self._pad(y), kernel.transpose(0, 1).flip(2, 3))

    def sandwich(self, x: Tensor, inner: Callable[[Tensor], Tensor]) -> Tensor:
        _check_input(x, self.in_shape, type(self).__name__)
        kernel = self.kernel()  # BCOP: one kernel composition for A and Aᵀ
        return self._adjoint(inner(F.conv2d(self._pad(x), kernel)), kernel)

    def singular_values(self) -> Tensor:
        return circular_conv_singular_values(self.kernel(), self.in_shape[1:])

    def export(self) -> ConvOperator:
        c_out, c_in, size = self.out_shape[0], self.in_shape[0], self.in_shape[1]
        kernel = self.kernel().detach()
        plain = ConvOperator(c_in, c_out, size, self.kernel_size).to(kernel)
        plain.weight.data.copy_(kernel)
        return plain


class OrthogonalConv(ConvOperator):
    """Orthogonal circular convolution (BCOP, Li et al. 2019) built on geotorch.

    ``K = H ⋆ R(P_1) ⋆ C(Q_1) ⋆ … ⋆ R(P_k) ⋆ C(Q_k)`` where ``H`` is orthogonal and every
    ``P = S Sᵀ`` is a projector from a Stiefel matrix ``S`` (``C × C/2``, orthonormal
    columns). ``R(P)`` is the 1×2 kernel ``[P, I − P]`` and ``C(P)`` its 2×1 transpose;
    ``k = kernel_size − 1`` factors of each make a ``kernel_size²`` kernel.
    Each factor is unitary at every frequency: ``(P + (I − P)e^{iω})*(P + (I − P)e^{iω}) =
    P + (I − P) = I``, so with circular padding ``AᵀA = AAᵀ = I`` exactly, on any grid.
    """

    def __init__(self, channels: int, size: int, kernel_size: int = 3, *, orthogonal_map: str = "expm"):
        super().__init__(channels, channels, size, kernel_size)
        c = self.in_shape[0]
        if c < 2:
            raise ValueError(f"an orthogonal convolution needs at least 2 channels, got {c}")
        del self.weight
        blocks = 2 * (kernel_size - 1)  # kernel_size - 1 row blocks and as many column blocks
        self.mix = nn.Parameter(torch.empty(c, c))
        self.frames = nn.Parameter(torch.empty(blocks, c, c // 2))
        nn.init.orthogonal_(self.mix)
        for frame in self.frames.data:
            nn.init.orthogonal_(frame)
        _orthogonalize(self, "mix", orthogonal_map)
        _orthogonalize(self, "frames", orthogonal_map)

    def kernel(self) -> Tensor:
        # Each factor multiplies the kernel by [P, I − P] along one axis: K' = [K P, 0] + [0, K − K P]
        # (the taps of :func:`compose_kernels` with a two-tap block, as matrix products).
        kernel = self.mix[:, :, None, None]
        for i, frame in enumerate(self.frames):
            kp = torch.einsum("oiyx,ij->ojyx", kernel, frame @ frame.T)
            rest = kernel - kp
            if i % 2 == 0:  # R(P): a 1×2 row factor, the kernel grows by one column
                kernel = F.pad(kp, (0, 1)) + F.pad(rest, (1, 0))
            else:  # C(P): a 2×1 column factor, one row more
                kernel = F.pad(kp, (0, 0, 0, 1)) + F.pad(rest, (0, 0, 1, 0))
        return kernel


class ChannelMix(ConvOperator):
    """1×1 convolution ``y[:, p] = M x[:, p]`` mixing channels at every pixel.

    ``orthogonal=True`` puts ``M`` (``c_out × c_in``) on geotorch's Stiefel manifold:
    an isometry when ``c_out ≥ c_in`` (lifting 3 → C channels), ``‖M‖ = 1`` with
    orthonormal rows when ``c_out < c_in`` (after a space-to-depth). ``‖A‖ = ‖M‖``.
    """

    def __init__(self, in_channels: int, out_channels: int, size: int, *, orthogonal: bool = True,
                 orthogonal_map: str = "expm"):
        super().__init__(in_channels, out_channels, size, kernel_size=1)
        del self.weight
        self.matrix = nn.Parameter(torch.empty(self.out_shape[0], self.in_shape[0]))
        nn.init.orthogonal_(self.matrix)
        self.orthogonal = orthogonal
        if orthogonal:
            _orthogonalize(self, "matrix", orthogonal_map)

    def kernel(self) -> Tensor:
        return self.matrix[:, :, None, None]
