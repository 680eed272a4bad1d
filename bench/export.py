"""Latency of the exported ONNX and LiteRT models against eager PyTorch, per sequence on one CPU thread, in one run.

    python bench/export.py                          # an untrained default-preset model (250 signs), 5-member ensemble
    python bench/export.py --checkpoint runs/X/best.pt --sequences 500 --members 0

Sequences are demo signing (`pipeline.demo.generate_sequence`) with lengths drawn from the real length
distribution (`sample_lengths`), kept to 3..384 frames. Each sequence runs through every method in turn
(interleaved, so machine noise hits all alike), after a warm-up; times are wall-clock per sequence:

- `onnxruntime`: the exported file on the raw (T, 543, 3) landmarks, preprocessing in the graph;
- `ai-edge-litert`: the `.tflite` export of the same checkpoint, the same way (its signature runner, one thread);
- `pytorch predict`: what `asl-train predict --checkpoint` does per sequence: the pipeline's numpy
  preprocessing, the collate, the eager model;
- `pytorch module`: the exported module (`LandmarkClassifier`) run eagerly: preprocessing in torch;
- `ensemble ...` (`--members N`, default 5; 0 skips them): one file holding N members (the checkpoint and N - 1
  more of the same preset, other seeds), through each runtime, and eager PyTorch predict averaging the members.

Targets: onnxruntime median <= 10 ms a sequence, >= 3x faster than eager PyTorch predict, file <= 10 MB;
LiteRT (the asl-signs competition's limits): p95 <= 100 ms a sequence, file <= 40 MB. Needs the export and
tflite extras (`make bench-export`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.demo import generate_sequence, sample_lengths
from train.checkpoint import build_model, save_checkpoint
from train.config import TrainConfig
from train.ensemble import EnsembleScorer
from train.exportgraph import LandmarkClassifier
from train.modelfile import ModelFile, onnx_session
from train.onnxexport import export_onnx
from train.predict import CheckpointScorer
from train.tflite import export_tflite

TARGET_MS = 10.0
TARGET_SPEEDUP = 3.0
TARGET_MB = 10.0
TARGET_LITERT_MS = 100.0
TARGET_LITERT_MB = 40.0


def untrained_checkpoint(path: Path, preset: str, signs: int, seed: int = 0) -> Path:
    """A checkpoint of a freshly initialized model: timing does not depend on the weights."""
    cfg = TrainConfig(preset=preset)
    torch.manual_seed(seed)
    model = build_model(cfg, signs)
    label_map = {f"sign_{i:03d}": i for i in range(signs)}
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "ema": None,
            "config": cfg.__dict__,
            "label_map": label_map,
            "step": 0,
            "epoch": 0,
        },
    )
    return path


def sequences(n: int, seed: int) -> list[np.ndarray]:
    lengths = np.clip(sample_lengths(np.random.default_rng(seed), n), 3, 384)
    return [generate_sequence(seed, i, i % 25, i % 10, int(t))[1] for i, t in enumerate(lengths)]


def latencies(methods: dict[str, Callable[[np.ndarray], object]], seqs: list[np.ndarray], warmup: int) -> dict:
    """Seconds per sequence for each method, the methods interleaved sequence by sequence."""
    for xyz in seqs[:warmup]:
        for fn in methods.values():
            fn(xyz)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for xyz in seqs:
        for name, fn in methods.items():
            start = time.perf_counter()
            fn(xyz)
            times[name].append(time.perf_counter() - start)
    return {name: np.array(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: an untrained model of --preset")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--signs", type=int, default=250)
    ap.add_argument("--sequences", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--members", type=int, default=5, help="ensemble rows of this many members (0: none)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    ckpt = args.checkpoint or untrained_checkpoint(tmp / "untrained.pt", args.preset, args.signs)
    start = time.perf_counter()
    result = export_onnx(ckpt, tmp / "model.onnx")
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    lite_result = export_tflite(ckpt, tmp / "model.tflite")
    lite_export_s = time.perf_counter() - start
    session = onnx_session(result.path, threads=1)
    litert = ModelFile(lite_result.path, threads=1).graph  # the runtime's own call, as for onnxruntime
    scorer = CheckpointScorer(ckpt, device="cpu")
    module = LandmarkClassifier(scorer.model).eval()

    def run_module(xyz: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return module(torch.from_numpy(xyz))

    methods = {
        "onnxruntime": lambda xyz: session.run(["outputs"], {"inputs": xyz}),
        "ai-edge-litert": litert.run,
        "pytorch predict": lambda xyz: scorer.probabilities([xyz]),
        "pytorch module": run_module,
    }
    sizes = {"onnxruntime": result.size, "ai-edge-litert": lite_result.size}
    if args.members > 1:
        members = [ckpt] + [
            untrained_checkpoint(tmp / f"member{k}.pt", args.preset, len(scorer.label_map), seed=k)
            for k in range(1, args.members)
        ]
        start = time.perf_counter()
        ens = export_onnx(members, tmp / "ensemble.onnx")
        ens_lite = export_tflite(members, tmp / "ensemble.tflite")
        print(
            f"{args.members}-member ensemble: export + parity check of both files {time.perf_counter() - start:.1f} s"
        )
        ens_session = onnx_session(ens.path, threads=1)
        ens_litert = ModelFile(ens_lite.path, threads=1).graph
        ens_scorer = EnsembleScorer([CheckpointScorer(m, device="cpu") for m in members], [str(m) for m in members])
        methods |= {
            f"ensemble x{args.members} onnxruntime": lambda xyz: ens_session.run(["outputs"], {"inputs": xyz}),
            f"ensemble x{args.members} ai-edge-litert": ens_litert.run,
            f"ensemble x{args.members} pytorch predict": lambda xyz: ens_scorer.probabilities([xyz]),
        }
        sizes |= {
            f"ensemble x{args.members} onnxruntime": ens.size,
            f"ensemble x{args.members} ai-edge-litert": ens_lite.size,
        }
    seqs = sequences(args.sequences, args.seed)
    times = latencies(methods, seqs, args.warmup)
    frames = np.array([len(s) for s in seqs])

    params = sum(p.numel() for p in scorer.model.parameters())
    source = ckpt if args.checkpoint else f"untrained preset {args.preset!r}"
    print(
        f"{source}: {params / 1e6:.2f} M parameters, {len(scorer.label_map)} signs; "
        f"export + parity check: ONNX {export_s:.1f} s, LiteRT {lite_export_s:.1f} s"
    )
    print(
        f"{len(seqs)} sequences, {frames.min()}..{frames.max()} frames (median {np.median(frames):.0f}, "
        f"mean {frames.mean():.1f}), one thread, {args.warmup} warm-up"
    )
    base = np.median(times["onnxruntime"])
    print(f"{'method':<34} {'median ms':>10} {'p95 ms':>8} {'mean ms':>8} {'median vs onnxruntime':>22} {'file MB':>8}")
    for name, t in times.items():
        med = np.median(t)
        size = f"{sizes[name] / 1e6:.2f}" if name in sizes else "-"
        print(
            f"{name:<34} {med * 1e3:>10.2f} {np.percentile(t, 95) * 1e3:>8.2f} {t.mean() * 1e3:>8.2f} "
            f"{med / base:>21.2f}x {size:>8}"
        )
    mb, lite_mb = result.size / 1e6, lite_result.size / 1e6
    speedup = np.median(times["pytorch predict"]) / base
    lite_p95 = np.percentile(times["ai-edge-litert"], 95) * 1e3
    print(f"file size: ONNX {mb:.2f} MB (opset {result.opset}), LiteRT {lite_mb:.2f} MB ({lite_mb / mb:.2f}x)")
    for label, ok, value in (
        (f"onnxruntime median <= {TARGET_MS:g} ms", base * 1e3 <= TARGET_MS, f"{base * 1e3:.2f} ms"),
        (f">= {TARGET_SPEEDUP:g}x faster than eager PyTorch predict", speedup >= TARGET_SPEEDUP, f"{speedup:.2f}x"),
        (f"file <= {TARGET_MB:g} MB", mb <= TARGET_MB, f"{mb:.2f} MB"),
        (f"LiteRT p95 <= {TARGET_LITERT_MS:g} ms", lite_p95 <= TARGET_LITERT_MS, f"{lite_p95:.2f} ms"),
        (f"LiteRT file <= {TARGET_LITERT_MB:g} MB", lite_mb <= TARGET_LITERT_MB, f"{lite_mb:.2f} MB"),
    ):
        print(f"target: {label} -> {value} {'PASS' if ok else 'MISS'}")


if __name__ == "__main__":
    main()
