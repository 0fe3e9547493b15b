"""Many linear SVMs at once: the VOC07 SVM protocol's per-class x cost x fold fits as
one batched computation on shared features.

Each problem p is scikit-learn's LinearSVC(C=cost_p, loss="squared_hinge", penalty="l2",
intercept_scaling=s) with per-sample weights (class_weight, and 0 for rows outside the
problem): minimise over w (the bias is the last coordinate, regularised as liblinear does,
on a constant feature s)

    f_p(w) = 1/2 ||w||^2 + C_p sum_i weight_pi * max(0, 1 - y_pi * x_i.w)^2

It is solved in the primal by Newton's method with conjugate-gradient steps (the
"generalised Hessian" I + 2 C X^T D X, D the weights of rows inside the margin: the
method of liblinear's primal L2-loss solver) and a backtracking line search, for every
problem at once: each CG step is two matrix products of the shared feature matrix with a
block of problem vectors, instead of one liblinear run per problem. scikit-learn's
per-problem loop is what benchmarks/svm_cost.py measures it against.
"""
import torch

_ARMIJO = 1e-4


def _objective(w: torch.Tensor, xw: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
               cost: torch.Tensor) -> torch.Tensor:
    hinge = (1 - y * xw).clamp_min(0)
    return 0.5 * (w * w).sum(0) + cost * (weight * hinge * hinge).sum(0)


def _cg(matvec, b: torch.Tensor, iters: int, rtol: float) -> torch.Tensor:
    """Conjugate gradients for the columns of b (each its own symmetric positive system)."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rs = (r * r).sum(0)
    target = (rtol ** 2) * rs
    for _ in range(iters):
        ap = matvec(p)
        alpha = rs / (p * ap).sum(0).clamp_min(1e-30)
        x += alpha * p
        r -= alpha * ap
        rs_new = (r * r).sum(0)
        if bool((rs_new <= target).all()):
            break
        p = r + (rs_new / rs.clamp_min(1e-30)) * p
        rs = rs_new
    return x


def _newton(xt: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, cost: torch.Tensor, tol: float,
            max_iter: int, cg_iter: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """W (d+1, P) and X~W (n, P) for one block of problems; the Newton iterations used."""
    n, d1 = xt.shape
    w = torch.zeros(d1, y.shape[1], dtype=xt.dtype, device=xt.device)
    xw = torch.zeros_like(y)
    g0 = None
    for it in range(max_iter):
        inside = weight * (y * xw < 1)
        grad = w + 2 * cost * (xt.T @ (inside * (xw - y)))
        norm = grad.norm(dim=0)
        g0 = norm if g0 is None else g0
        todo = torch.nonzero(norm > tol * g0.clamp_min(1e-12)).flatten()
        if len(todo) == 0:
            return w, xw, it
        c, dk = cost[todo], inside[:, todo]
        step = _cg(lambda v: v + 2 * c * (xt.T @ (dk * (xt @ v))), -grad[:, todo], cg_iter, 0.1)
        xstep = xt @ step
        wk, xwk, yk, weightk = w[:, todo], xw[:, todo], y[:, todo], weight[:, todo]
        f0, slope = _objective(wk, xwk, yk, weightk, c), (grad[:, todo] * step).sum(0)
        t = torch.ones_like(c)
        for _ in range(30):  # halve t where the Armijo condition fails
            ok = _objective(wk + t * step, xwk + t * xstep, yk, weightk, c) <= f0 + _ARMIJO * t * slope
            if bool(ok.all()):
                break
            t = torch.where(ok, t, t / 2)
        w[:, todo] = wk + t * step
        xw[:, todo] = xwk + t * xstep
    return w, xw, max_iter


def fit_svms(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, cost: torch.Tensor, *,
             intercept_scaling: float = 1.0, tol: float = 1e-3, max_iter: int = 50, cg_iter: int = 100,
             device=None, max_elements: int = 1 << 25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve P squared-hinge SVMs on the rows of x (n, d).

    y (n, P) targets in {-1, +1}; weight (n, P) >= 0 per-sample weights (0: the row is not
    in that problem); cost (P,). Problems are solved in blocks of at most `max_elements`
    n x P values (memory), on `device` (default x's). Returns (W (d, P), b (P,), the
    decision values x.W + b (n, P)), on the CPU. `tol`: each problem stops when its gradient
    norm is below tol x its norm at w = 0 (liblinear's primal criterion)."""
    device = torch.device(device) if device is not None else x.device
    # float64 on CPUs: the large costs (C = 100) make the Newton systems ill-conditioned, and
    # the CPU time goes mostly to the matrix products either way; GPUs get float32.
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    xt = torch.cat([x.to(device, dtype), torch.full((len(x), 1), float(intercept_scaling),
                                                     dtype=dtype, device=device)], 1)
    block = max(1, max_elements // max(len(x), 1))
    ws, decisions = [], []
    for s in range(0, y.shape[1], block):
        part = slice(s, s + block)
        w, xw, _ = _newton(xt, y[:, part].to(device, dtype), weight[:, part].to(device, dtype),
                           cost[part].to(device, dtype), tol, max_iter, cg_iter)
        ws.append(w.cpu())
        decisions.append(xw.cpu())
    w = torch.cat(ws, 1)
    return w[:-1].float(), (w[-1] * intercept_scaling).float(), torch.cat(decisions, 1).float()
