"""``moce-fast``: command-line entry point.

Subcommands:
  selfcheck   build MoCE-IR, run it on a real photo from scikit-image, check it against the
              reference model, print shape, backend and time.
"""

from __future__ import annotations

import argparse
import sys
import time


def _photo(size: int):
    """A real photo (scikit-image's astronaut, shipped with the package), centre crop, (1, 3, H, W) in [0, 1]."""
    import numpy as np
    import torch
    from skimage import data

    img = data.astronaut()
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    crop = img[top:top + size, left:left + size].astype(np.float32) / 255.0
    return torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0).contiguous()


def selfcheck(args) -> int:
    import torch

    import moce_fast
    from moce_fast.configs import get_config
    from moce_fast.ops import last_run

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = moce_fast.MoCEIR.from_config(args.config).to(device).eval()
    ref = moce_fast.reference.MoCEIR(**get_config(args.config)).to(device).eval()
    ref.load_state_dict(model.state_dict())
    x = _photo(args.size).to(device)
    # An odd crop exercises the pad-to-8 path too.
    x_odd = x[..., : args.size - 3, : args.size - 5]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"moce_fast {moce_fast.__version__}, torch {torch.__version__}, device {device}")
    print(f"model {args.config}: {n_params:,} parameters (random init: no weights are downloaded)")
    with moce_fast.backend(args.backend), torch.inference_mode():
        model(x_odd)  # warm-up
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            y = model(x_odd)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        y_ref = ref(x_odd)
    backends = sorted(set(last_run().values()))
    err = ((y - y_ref).abs().max() / y_ref.abs().max().clamp_min(1e-12)).item()
    print(f"input  {tuple(x_odd.shape)} (astronaut photo, centre crop)")
    print(f"output {tuple(y.shape)} {y.dtype}")
    print(f"backend requested {args.backend!r}, ran: {', '.join(backends)}")
    print(f"time per forward: {min(times) * 1e3:.1f} ms (best of {args.repeat}), on {device}")
    print(f"max relative difference to the reference model: {err:.2e}")
    ok = y.shape == x_odd.shape and torch.isfinite(y).all().item() and err < 1e-4
    print("selfcheck: OK" if ok else "selfcheck: FAILED")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moce-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("selfcheck", help="run MoCE-IR on a real photo and check it against the reference")
    p.add_argument("--config", default="MoCE_IR", choices=["MoCE_IR", "MoCE_IR_S"])
    p.add_argument("--size", type=int, default=128, help="side of the centre crop (default 128)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=selfcheck)
    args = parser.parse_args(argv)
    if getattr(args, "size", 16) < 16:
        parser.error(f"--size: expected at least 16, got {args.size}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
