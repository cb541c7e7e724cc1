"""Research demo that needs second derivatives: a 2-D signed-distance field fitted with an eikonal term.

The shape is drawn here, so its exact signed distance is known: a rotated rounded rectangle with a
round hole, whose distance is evaluated by brute force against a dense sampling of its boundary
(nearest boundary point, sign from its outward normal). The error of the learned field is measured
against that true distance, not against another network. The loss (as in implicit geometric
regularisation) asks for f = 0 and grad f = the outward normal on boundary samples, and
|grad f| = 1 (the eikonal equation) on random points of the square: the gradient of grad f with
respect to the weights is a second derivative, taken through FusedMLP with create_graph=True.

Trained three times from the same initial weights and the same samples, one step of each in turn:
FusedMLP as shipped (its dispatcher measures the fused MLP against PyTorch and keeps the faster),
FusedMLP with measuring off (the fused MLP op always), and the eager nn.Linear + activation
reference. Reports the mean and max |f - distance| on a grid, the eikonal residual, and the median
time per step of each; writes the learned fields, the exact one and the loss curves to
benchmarks/results/demo_sdf.png.

    python examples/sdf.py [--steps 600] [--width 64] [--layers 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import nnfast

ROOT = Path(__file__).resolve().parent.parent


def boundary(n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 2) points on the shape's boundary and (n, 2) outward unit normals.

    The shape: a rounded rectangle (half sizes 0.55 x 0.3, corner radius 0.15) rotated by 30
    degrees, minus a disc of radius 0.15 centred at (0.25, 0). Points are spread over the
    boundary by arc length."""
    hx, hy, r = 0.55 - 0.15, 0.3 - 0.15, 0.15
    pieces = []  # (points, normals) of each boundary piece, parametrised finely
    t = torch.linspace(0, 1, 4000, dtype=torch.float64)[:-1]
    for cx, cy, nx, ny, ax_x, ax_y, length in (
        (0.0, hy + r, 0.0, 1.0, 1.0, 0.0, 2 * hx),  # top edge
        (0.0, -hy - r, 0.0, -1.0, 1.0, 0.0, 2 * hx),  # bottom edge
        (hx + r, 0.0, 1.0, 0.0, 0.0, 1.0, 2 * hy),  # right edge
        (-hx - r, 0.0, -1.0, 0.0, 0.0, 1.0, 2 * hy),  # left edge
    ):
        s = (t - 0.5) * length
        pts = torch.stack([cx + ax_x * s, cy + ax_y * s], dim=1)
        pieces.append((pts, torch.tensor([nx, ny], dtype=torch.float64).expand_as(pts)))
    for cx, cy, a0 in ((hx, hy, 0), (-hx, hy, 90), (-hx, -hy, 180), (hx, -hy, 270)):
        a = torch.deg2rad(a0 + 90 * t)
        nrm = torch.stack([a.cos(), a.sin()], dim=1)
        pieces.append((torch.tensor([cx, cy], dtype=torch.float64) + r * nrm, nrm))
    a = 2 * math.pi * t
    hole = torch.stack([a.cos(), a.sin()], dim=1)
    pieces.append((torch.tensor([0.25, 0.0], dtype=torch.float64) + 0.15 * hole, -hole))
    rot = math.radians(30)
    rmat = torch.tensor([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
    pts = torch.cat([p for p, _ in pieces]) @ rmat.double().T
    nrm = torch.cat([n for _, n in pieces]) @ rmat.double().T
    # arc-length weights: pieces were sampled with equal counts
    lengths = [2 * hx, 2 * hx, 2 * hy, 2 * hy] + [r * math.pi / 2] * 4 + [2 * math.pi * 0.15]
    weights = torch.cat([torch.full((len(t),), ell / len(t)) for ell in lengths])
    idx = torch.multinomial(
        weights, n, replacement=True, generator=torch.Generator().manual_seed(1)
    )
    return pts[idx].float().to(device), nrm[idx].float().to(device), pts, nrm


def exact_sdf(q: torch.Tensor, pts: torch.Tensor, nrm: torch.Tensor) -> torch.Tensor:
    """Signed distance of points q (n, 2) to the dense boundary polyline: nearest boundary point,
    sign from its outward normal."""
    q = q.double().cpu()
    out = torch.empty(len(q), dtype=torch.float64)
    for s in range(0, len(q), 2048):
        d = torch.cdist(q[s : s + 2048], pts)
        dist, i = d.min(dim=1)
        side = ((q[s : s + 2048] - pts[i]) * nrm[i]).sum(1).sign()
        out[s : s + 2048] = dist * side
    return out


def losses(model, surf, normals, free):
    """(total, eikonal residual): f = 0 and grad f = n on the boundary, |grad f| = 1 everywhere."""
    x = torch.cat([surf, free]).requires_grad_()
    f = model(x)
    (g,) = torch.autograd.grad(f.sum(), x, create_graph=True)  # the first derivative, as a graph
    ns = len(surf)
    on_surface = f[:ns].abs().mean()
    normal = (g[:ns] - normals).norm(dim=1).mean()
    eikonal = (g.norm(dim=1) - 1).square().mean()
    return on_surface + normal + 0.1 * eikonal, eikonal


def train(runs: dict, steps: int, lr: float, batches) -> dict:
    """Full-batch Adam for every run, one step each in turn (interleaved, so the machine's drift
    hits all alike); returns {name: (loss per step, seconds per step)}. A run is (model, setting):
    the setting is the nnfast dispatcher's mode during its steps."""
    state = {}
    for name, (model, _) in runs.items():
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        state[name] = (opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps), [], [])
    try:
        from tqdm import tqdm
    except ImportError:

        def tqdm(it, **_):
            return it

    for step in tqdm(range(steps), desc="sdf", file=sys.stderr):
        surf, normals, free = batches(step)
        for name, (model, mode) in runs.items():
            opt, sched, history, times = state[name]
            nnfast.set_dispatch(mode)
            start = time.perf_counter()
            loss, _ = losses(model, surf, normals, free)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # through the gradient: second derivatives
            opt.step()
            if surf.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            sched.step()
            history.append(loss.item())
    nnfast.set_dispatch("measure")
    return {name: (st[2], st[3]) for name, st in state.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=3, help="hidden layers")
    p.add_argument("--activation", default="silu", choices=["silu", "tanh", "gelu"])
    p.add_argument("--surface", type=int, default=2048, help="boundary samples per step")
    p.add_argument("--free", type=int, default=6144, help="random samples per step")
    p.add_argument("--grid", type=int, default=128, help="evaluation grid side")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo_sdf.png")
    args = p.parse_args(argv)
    dev = args.device

    surf_all, nrm_all, dense_pts, dense_nrm = boundary(50_000, dev)
    g = torch.Generator().manual_seed(2)
    plan = [
        (
            torch.randint(0, len(surf_all), (args.surface,), generator=g),
            torch.rand(args.free, 2, generator=g) * 2 - 1,
        )
        for _ in range(args.steps)
    ]

    def batches(step):  # the same samples for both runs
        idx, free = plan[step]
        return surf_all[idx], nrm_all[idx], free.to(dev)

    torch.manual_seed(0)
    auto = nnfast.FusedMLP(2, [args.width] * args.layers, 1, activation=args.activation, device=dev)
    fused = copy.deepcopy(auto)
    eager = auto.to_sequential()  # the same network as nn.Linear + nn.SiLU, same weights
    # nnfast as shipped (the dispatcher measures the fused MLP against PyTorch and keeps the
    # faster), nnfast with measuring off (its fused MLP op always), and the eager reference
    runs = {
        "nnfast": (auto, "measure"),
        "nnfast fused": (fused, "fixed"),
        "eager": (eager, "fixed"),
    }
    result = train(runs, args.steps, args.lr, batches)

    axis = torch.linspace(-1, 1, args.grid)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).reshape(-1, 2)
    exact = exact_sdf(grid, dense_pts, dense_nrm)
    errors, fields, ms = {}, {}, {}
    for name, (model, _) in runs.items():
        pred = model(grid.to(dev)).detach().double().cpu().squeeze(1)
        fields[name] = pred
        err = (pred - exact).abs()
        _, eik = losses(model, surf_all[:256], nrm_all[:256], grid.to(dev)[::7])
        errors[name] = (err.mean().item(), err.max().item(), eik.item())
        ms[name] = statistics.median(result[name][1]) * 1e3
    for name, (mean, worst, eik) in errors.items():
        print(
            f"{name}: |f - distance| mean {mean:.4f}, max {worst:.4f} on a {args.grid}^2 grid;"
            f" eikonal residual (|grad f| - 1)^2 = {eik:.2e}; {ms[name]:.2f} ms per step"
            f" ({ms[name] / ms['eager']:.2f}x eager)"
        )
    hist = {name: r[0] for name, r in result.items()}
    gap = max(
        abs(a - b) / max(abs(b), 1e-12)
        for a, b in zip(hist["nnfast fused"][:50], hist["eager"][:50])
    )
    print(f"largest relative loss gap, fused vs eager, in the first 50 steps: {gap:.2e}")
    print(f"on {dev}, {torch.get_num_threads()} threads; the dispatcher's decisions:")
    print(nnfast.dispatch_report())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    side = args.grid
    for ax, (title, field) in zip(
        axes,
        (
            ("exact signed distance", exact),
            (f"nnfast FusedMLP (mean err {errors['nnfast fused'][0]:.4f})", fields["nnfast fused"]),
            (f"eager reference (mean err {errors['eager'][0]:.4f})", fields["eager"]),
        ),
    ):
        img = field.reshape(side, side).numpy()
        ax.imshow(img, extent=(-1, 1, -1, 1), origin="lower", cmap="RdBu", vmin=-0.8, vmax=0.8)
        ax.contour(img, levels=12, extent=(-1, 1, -1, 1), colors="k", linewidths=0.4)
        ax.contour(img, levels=[0], extent=(-1, 1, -1, 1), colors="k", linewidths=1.6)
        ax.set_title(title)
        ax.set_aspect("equal")
    for (name, h), style in zip(hist.items(), ("-", ":", "--")):
        axes[3].semilogy(h, style, label=f"{name} ({ms[name]:.1f} ms/step)")
    axes[3].set_xlabel("step")
    axes[3].set_ylabel("loss")
    axes[3].legend()
    axes[3].grid(alpha=0.3)
    fig.suptitle(
        f"2-D SDF with an eikonal term: FusedMLP(2, [{args.width}]x{args.layers}, 1,"
        f" {args.activation}), second derivatives through create_graph=True, on {dev}"
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"picture: {args.out}")
    return {"loss": hist, "errors": errors, "early_gap": gap, "ms": ms}


if __name__ == "__main__":
    main()
