"""``moce-fast``: the command line.

  demo       train the tiny MoCE-IR for a few minutes on scikit-image's photos, evaluate it, write
             side-by-side images and the routing heatmap (the README's main job)
  train      all-in-one training (MoCE_IR, MoCE_IR_S or tiny); under torchrun, DistributedDataParallel
  eval       PSNR/SSIM per task and expert usage per task and MoCE layer, for any checkpoint
  restore    restore image files with a checkpoint (public Lightning .ckpt files included)
  bench      run the benchmark suites in bench/, print a table of speed-ups and plot them
  selfcheck  build MoCE-IR, run it on a real photo, check it against the reference model
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

CONFIG_CHOICES = ["MoCE_IR", "MoCE_IR_S", "tiny"]
BACKEND_CHOICES = ["auto", "torch", "triton", "cuda", "cpu"]  # moce_fast.ops.BACKENDS (a test keeps them equal)
# The paper's five-task all-in-one setting: noise (three levels), rain, haze, motion blur, low light.
DEMO_TASKS = ("noise15", "noise25", "noise50", "rain", "haze", "motion_blur", "lowlight")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _parse_tasks(text: str) -> tuple[str, ...]:
    from moce_fast.data import TASKS

    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    for t in tasks:
        if t not in TASKS and not (t.startswith("noise") and t[5:].isdigit()):
            raise CLIError(f"--tasks: unknown task {t!r}; expected some of {', '.join(TASKS)}")
    if not tasks:
        raise CLIError("--tasks: expected at least one task")
    return tasks


def _positive_minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of minutes, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of minutes, got {text!r}")
    return value


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


def _save_png(path, img) -> None:
    import numpy as np
    from skimage import io, util

    io.imsave(str(path), util.img_as_ubyte(np.clip(img, 0.0, 1.0)), check_contrast=False)


def _load_model(args):
    import torch

    import moce_fast
    # without --config, the model the file records (moce_fast's own files), else MoCE_IR; a model
    # built from recorded arguments alone has no configuration name
    model = moce_fast.load_checkpoint(args.checkpoint, config=args.config, allow_pickle=args.allow_pickle)
    config = args.config or getattr(model, "config_name", None) or "the recorded configuration"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device), config


# ----------------------------------------------------------------------------------------- commands

def cmd_selfcheck(args) -> int:
    import torch

    import moce_fast
    from moce_fast.configs import get_config
    from moce_fast.ops import recording

    if args.size < 16:
        raise CLIError(f"--size: expected at least 16, got {args.size}")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = moce_fast.MoCEIR.from_config(args.config).to(device).eval()
    ref = moce_fast.reference.MoCEIR(**get_config(args.config)).to(device).eval()
    ref.load_state_dict(model.state_dict())
    x = _photo(args.size).to(device)
    x_odd = x[..., : args.size - 3, : args.size - 5]  # an odd size exercises the pad-to-8 path
    n_params = sum(p.numel() for p in model.parameters())
    print(f"moce_fast {moce_fast.__version__}, torch {torch.__version__}, device {device}")
    print(f"model {args.config}: {n_params:,} parameters (random init: no weights are downloaded)")
    # (recording: the backends of this model's calls, not of ops called before in the process)
    with moce_fast.backend(args.backend), torch.inference_mode(), recording() as ran:
        model(x_odd)  # warm-up
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            y = model(x_odd)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        y_ref = ref(x_odd)
    backends = sorted(set(ran.values()))
    err = ((y - y_ref).abs().max() / y_ref.abs().max().clamp_min(1e-12)).item()
    print(f"input  {tuple(x_odd.shape)} (astronaut photo, centre crop)")
    print(f"output {tuple(y.shape)} {y.dtype}")
    print(f"backend requested {args.backend!r}, ran: {', '.join(backends)}")
    print(f"time per forward: {min(times) * 1e3:.1f} ms (best of {args.repeat}), on {device}")
    print(f"max relative difference to the reference model: {err:.2e}")
    ok = y.shape == x_odd.shape and torch.isfinite(y).all().item() and err < 1e-4
    print("selfcheck: OK" if ok else "selfcheck: FAILED")
    return 0 if ok else 1


def cmd_train(args) -> int:
    from moce_fast.train import TrainConfig, train

    if args.steps is None and args.minutes is None:
        raise CLIError("train: give --steps N or --minutes M")
    cfg = TrainConfig(config=args.config, tasks=_parse_tasks(args.tasks), data=args.data, crop=args.crop,
                      batch_size=args.batch_size, steps=args.steps, minutes=args.minutes, lr=args.lr, out=args.out,
                      resume=args.resume, backend=args.backend, device=args.device, seed=args.seed,
                      save_every=args.save_every, progress=not args.no_progress)
    _, summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=1))
        print(f"checkpoint: {Path(args.out) / 'model.safetensors'} (resume with --resume)")
    return 0 if summary["replicas_in_sync"] else 1


def _photos_for_eval(data):
    from moce_fast.data import bundled_photos, folder_photos, split_photos

    photos = bundled_photos() if data is None else folder_photos(data)
    return split_photos(photos)[1]


def _write_eval(result, stage: Path, title: str) -> None:
    from moce_fast.train import expert_usage_heatmap

    (stage / "metrics.json").write_text(json.dumps(
        {"metrics": result.metrics, "usage": {k: v.tolist() for k, v in result.usage.items()},
         "tasks": result.tasks, "y_channel": result.y_channel}, indent=1))
    (stage / "report.txt").write_text(result.table() + "\n\n" + result.usage_table() + "\n")
    expert_usage_heatmap(result, stage / "expert_usage.png", title=title)


def cmd_eval(args) -> int:
    from moce_fast.train import evaluate
    from moce_fast.train.io import staged_output

    model, config = _load_model(args)
    result = evaluate(model, _photos_for_eval(args.data), _parse_tasks(args.tasks), crop=args.crop,
                      crops_per_task=args.crops_per_task, seed=args.seed, y_channel=args.y_channel)
    print(result.table())
    print()
    print(result.usage_table())
    with staged_output(args.out) as stage:
        _write_eval(result, stage, f"Expert usage per task ({config})")
    print(f"wrote {args.out}/metrics.json, report.txt, expert_usage.png")
    return 0


def cmd_restore(args) -> int:
    import torch

    from moce_fast.data import read_image
    from moce_fast.train.io import staged_output

    images = []
    for path in args.inputs:
        if not Path(path).is_file():
            raise CLIError(f"restore: no file {path!r}")
        images.append((Path(path), read_image(path)))
    model, config = _load_model(args)
    device = next(model.parameters()).device
    # Images of one size go through the model together, in batches.
    by_size: dict[tuple, list] = {}
    for path, img in images:
        by_size.setdefault(img.shape, []).append((path, img))
    names = [p.stem for p, _ in images]
    if len(set(names)) != len(names):
        raise CLIError("restore: two inputs have the same file name; restore them into different --out folders")
    with staged_output(args.out) as stage, torch.inference_mode():
        for group in by_size.values():
            for start in range(0, len(group), args.batch_size):
                chunk = group[start:start + args.batch_size]
                x = torch.stack([torch.from_numpy(img).permute(2, 0, 1) for _, img in chunk]).to(device)
                y = model(x).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
                for (path, _), out in zip(chunk, y):
                    _save_png(stage / f"{path.stem}.png", out)
    print(f"restored {len(images)} image(s) with {config} into {args.out}")
    return 0


def cmd_demo(args) -> int:
    import numpy as np

    from moce_fast.data import bundled_photos, split_photos
    from moce_fast.train import TrainConfig, evaluate, train
    from moce_fast.train.io import staged_output

    t_start = time.perf_counter()
    train_photos, eval_photos = split_photos(bundled_photos())
    print(f"photos: training on {', '.join(p.name for p in train_photos)}; "
          f"held out for evaluation: {', '.join(p.name for p in eval_photos)}")
    print(f"tasks: {', '.join(DEMO_TASKS)}; training the tiny MoCE-IR for {args.minutes:g} min on "
          f"{args.crop}x{args.crop} crops, batch {args.batch_size}")
    with staged_output(args.out) as stage:
        cfg = TrainConfig(config="tiny", tasks=DEMO_TASKS, crop=args.crop, batch_size=args.batch_size,
                          minutes=args.minutes, lr=args.lr, out=str(stage / "checkpoint"), seed=args.seed,
                          save_every=0, backend=args.backend, progress=not args.no_progress)
        model, summary = train(cfg)
        print(f"trained {summary['steps']} steps ({summary['images']} crops) in {summary['seconds']:.0f} s")
        result = evaluate(model, eval_photos, DEMO_TASKS, crop=args.eval_crop, crops_per_task=args.eval_crops,
                          seed=args.seed + 1)
        print()
        print(result.table())
        print()
        print(result.usage_table())
        for task, (degraded, restored, clean) in result.samples.items():
            gap = np.ones((degraded.shape[0], 4, 3), np.float32)
            _save_png(stage / f"{task}.png", np.concatenate([degraded, gap, np.clip(restored, 0, 1), gap, clean], 1))
        _write_eval(result, stage, "Expert usage per task (tiny MoCE-IR, demo)")
    noise = [t for t in DEMO_TASKS if t.startswith("noise")]
    gains = {t: result.metrics[t]["psnr_out"] - result.metrics[t]["psnr_in"] for t in noise}
    print()
    print("denoising PSNR gain over the noisy input: " + ", ".join(f"{t} {g:+.2f} dB" for t, g in gains.items()))
    print(f"wrote {args.out}/: <task>.png (degraded | restored | clean), expert_usage.png, metrics.json, "
          f"report.txt, checkpoint/ (model.safetensors)")
    print(f"demo finished in {time.perf_counter() - t_start:.0f} s")
    return 0


def cmd_bench(args) -> int:
    import subprocess
    import tempfile

    bench_dir = Path(__file__).resolve().parent.parent / "bench"
    if not bench_dir.is_dir():
        raise CLIError(f"bench: no bench/ folder beside the package ({bench_dir}); run from a source checkout")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "pytest", str(bench_dir), "--benchmark-only", f"--benchmark-json={raw}", "-q",
               "-p", "no:cacheprovider"]
        if args.k:
            cmd += ["-k", args.k]
        print("running:", " ".join(cmd))
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not raw.is_file():
            raise CLIError(f"bench: the benchmark run failed (exit status {proc.returncode})")
        report = json.loads(raw.read_text())
    rows, device = summarize_benchmarks(report)
    print(f"\ndevice: {device}")
    print(f"{'group':<44} {'case':<28} {'median ms':>10} {'speed-up':>9}")
    for group, case, ms, speedup in rows:
        print(f"{group:<44} {case:<28} {ms:10.2f} {speedup:8.2f}x")
    from moce_fast.train.io import staged_output

    with staged_output(args.out) as stage:
        (stage / "bench.json").write_text(json.dumps(report, indent=1))
        plot_speedups(rows, device, stage / "speedups.png")
    print(f"wrote {args.out}/bench.json and speedups.png (speed-up = baseline median / case median; baseline: "
          f"the public-style case of each group)")
    return 0


BASELINES = ("public-eval", "public", "reference")


def summarize_benchmarks(report: dict):
    """Rows (group, case, median ms, speed-up over the group's baseline) from pytest-benchmark JSON."""
    groups: dict[str, list] = {}
    for b in report["benchmarks"]:
        case = b.get("param") or b["name"]
        groups.setdefault(b.get("group") or b["name"], []).append((case, b["stats"]["median"] * 1e3, b))
    rows = []
    for group, cases in groups.items():
        base = None
        for name in BASELINES:
            base = next((ms for case, ms, b in cases if (b.get("params") or {}).get("impl") == name), None)
            if base is not None:
                break
        base = base or max(ms for _, ms, _ in cases)
        for case, ms, b in cases:
            rows.append((group, str((b.get("params") or {}).get("impl", case)), ms, base / ms))
    device = report.get("machine_info", {}).get("device", "unknown device")
    return rows, device


def plot_speedups(rows, device: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r[0] for r in rows))
    cases = list(dict.fromkeys(r[1] for r in rows))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(groups), 4))
    width = 0.8 / max(len(cases), 1)
    for i, case in enumerate(cases):
        vals = [next((r[3] for r in rows if r[0] == g and r[1] == case), 0.0) for g in groups]
        ax.bar([g + i * width for g in range(len(groups))], vals, width, label=case)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([g.replace(" ", "\n", 2) for g in groups], fontsize=7)
    ax.set_ylabel("speed-up over the public-style baseline")
    ax.set_title(f"moce_fast benchmarks on {device}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moce-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level (which backend ran)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train the tiny model for a few minutes, evaluate, write images")
    p.add_argument("--minutes", type=_positive_minutes, default=3.0, help="training time (default 3)")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-crop", type=int, default=128)
    p.add_argument("--eval-crops", type=int, default=4, help="held-out crops per task")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train MoCE-IR on degraded crops of real photos")
    p.add_argument("--config", default="tiny", choices=CONFIG_CHOICES)
    p.add_argument("--data", help="a folder of clean photos (default: scikit-image's bundled photos)")
    p.add_argument("--tasks", default=",".join(DEMO_TASKS))
    p.add_argument("--steps", type=int)
    p.add_argument("--minutes", type=_positive_minutes)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--out", default="runs/moce_fast")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    p.add_argument("--device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    for name, func, help_ in [("eval", cmd_eval, "PSNR/SSIM per task and expert usage for a checkpoint"),
                              ("restore", cmd_restore, "restore image files with a checkpoint")]:
        p = sub.add_parser(name, help=help_)
        if name == "restore":
            p.add_argument("inputs", nargs="+", metavar="IN")
            p.add_argument("--batch-size", type=int, default=4)
        p.add_argument("--checkpoint", required=True, help=".ckpt (public Lightning), .pt/.pth or .safetensors")
        p.add_argument("--config", choices=CONFIG_CHOICES,
                       help="model configuration (default: recorded in the checkpoint, else MoCE_IR)")
        p.add_argument("--out", required=(name == "restore"), default="eval_out")
        p.add_argument("--device")
        p.add_argument("--allow-pickle", action="store_true", help="full unpickling, for trusted .ckpt files only")
        if name == "eval":
            p.add_argument("--data")
            p.add_argument("--tasks", default=",".join(DEMO_TASKS))
            p.add_argument("--crop", type=int, default=128)
            p.add_argument("--crops-per-task", type=int, default=8)
            p.add_argument("--y-channel", action="store_true", help="metrics on the Y channel of YCbCr")
            p.add_argument("--seed", type=int, default=12345)
        p.set_defaults(func=func)

    p = sub.add_parser("bench", help="run bench/ and plot speed-ups")
    p.add_argument("-k", help="pytest -k expression to select benchmark cases")
    p.add_argument("--out", default="bench_out")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("selfcheck", help="run MoCE-IR on a real photo and check it against the reference")
    p.add_argument("--config", default="MoCE_IR", choices=CONFIG_CHOICES)
    p.add_argument("--size", type=int, default=128, help="side of the centre crop (default 128)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_selfcheck)
    return parser


def main(argv=None) -> int:
    from moce_fast.models import CheckpointError
    from moce_fast.ops import BackendUnavailableError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (CLIError, CheckpointError, BackendUnavailableError, FileNotFoundError, ValueError) as err:
        if args.verbose:
            raise
        print(f"moce-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
