"""`python -m kernels --build`: compile (or load from the cache) every backend this machine can.

The CPU extension always; the CUDA one wherever nvcc and a CUDA build of torch exist, GPU or
not. Each built backend is then checked against the reference on a small input when it can
run here. Exits non-zero if a build or a check fails.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import build, fused_chain_loss, reference


def _smoke_check(backend: str, device: str) -> str:
    """Run the op on a small input and compare it with the reference; returns a summary."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, 50, generator=gen).to(device).requires_grad_()
    labels = torch.randint(0, 50, (4, 9), generator=gen).to(device)
    labels[0, :3] = -100
    chains = torch.tensor([[0, 1, 2], [3, 2, -1]], device=device)
    ref = torch.randn(4, generator=gen).to(device)
    loss, logps = fused_chain_loss(logits, labels, chains, ref, backend=backend)
    (grad,) = torch.autograd.grad(loss, logits)
    logits_r = logits.detach().clone().requires_grad_()
    loss_r, logps_r = reference.fused_chain_loss(logits_r, labels, chains, ref)
    (grad_r,) = torch.autograd.grad(loss_r, logits_r)
    err = max((loss - loss_r).abs().item(), (logps - logps_r).abs().max().item(),
              (grad - grad_r).abs().max().item())
    if err > 1e-4:
        raise RuntimeError(f"{backend} differs from the reference by {err:.2e}")
    return f"matches the reference (max abs diff {err:.1e})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="build every backend possible here")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return 0
    failed = False
    for backend in ("cpu", "cuda"):
        if backend == "cuda":
            possible, why = build.cuda_build_possible()
            if not possible:
                print(f"cuda: skipped ({why})")
                continue
        start = time.time()
        try:
            library = build.load(backend, verbose=args.verbose)
        except build.BuildError as e:
            print(f"{backend}: BUILD FAILED\n{e}", file=sys.stderr)
            failed = True
            continue
        line = f"{backend}: ready in {time.time() - start:.0f} s ({library})"
        if backend == "cuda" and not torch.cuda.is_available():
            print(f"{line}; loaded, not run (no GPU here)")
            continue
        try:
            print(f"{line}; {_smoke_check(backend, backend)}")
        except Exception as e:  # a wrong result or a crash: both are failures of this build
            print(f"{line}; CHECK FAILED: {e}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
