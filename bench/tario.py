"""The hand-written tar and `.npy` code of `pipeline.tario` against the libraries that could replace it, in one run.

    python bench/tario.py [--sequences 500] [--work-dir DIR] [--rounds 5]

On the members of real shards (demo data built with `build_shards`, held in memory):

- tar reading: `tar_members` vs `tarfile` (streaming mode "r|", as a pipe or socket needs) and
  webdataset's own `tariterators.tar_file_iterator`;
- `.npy` decoding: `load_npy` vs `np.lib.format.read_array(..., allow_pickle=False)`;
- a whole sample (tar members, then `decode_compact`) vs the same through `tarfile` + `read_array`;
- tar writing: `ustar_header` vs `tarfile.TarInfo(...).tobuf(USTAR_FORMAT)` with fixed mtime, uid, gid, user and
  group names, and whether tarfile's bytes equal the shards' (a shard must stay byte-identical).

Times are the best of `--rounds`, the methods interleaved; ratios are library time / ours.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import ensure_demo

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.build import BuildOptions, build_shards  # noqa: E402
from pipeline.shards import decode_compact, iter_members  # noqa: E402
from pipeline.tario import load_npy, member_blocks, tar_members, ustar_header  # noqa: E402


def tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def webdataset_members(data: bytes) -> list[tuple[str, bytes]]:
    from webdataset.tariterators import tar_file_iterator

    return [(s["fname"], s["data"]) for s in tar_file_iterator(io.BytesIO(data))]


def numpy_npy(data: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def library_samples(data: bytes) -> int:
    """Every sample through tarfile and numpy: the members grouped by key, the arrays decoded."""
    groups: dict[str, dict[str, bytes]] = {}
    for name, raw in tarfile_members(data):
        key, _, ext = name.partition(".")
        groups.setdefault(key, {})[ext] = raw
    for members in groups.values():
        numpy_npy(members["x.npy"]), numpy_npy(members["missing.npy"])
    return len(groups)


def our_samples(data: bytes) -> int:
    n = 0
    for key, members in iter_members(io.BytesIO(data), "bench"):
        decode_compact(members, key)
        n += 1
    return n


def tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info.tobuf(tarfile.USTAR_FORMAT)


def tarfile_shard(members: list[tuple[str, bytes]]) -> bytes:
    """A whole archive written by tarfile with the same fixed header fields."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                len(data),
                0,
                0o644,
                0,
                0,
                "",
                "",
            )
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def best(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best seconds of each function over `rounds`, interleaved so that machine noise hits all alike."""
    times = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=500)
    ap.add_argument("--work-dir", type=Path, default=None, help="reuse demo data and shards here (made when absent)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-tario-"))
    ensure_demo(work / "data", args.sequences)
    shards = work / "shards"
    build_shards(work / "data", shards, BuildOptions(shard_size=100), jobs=2)
    blobs = [p.read_bytes() for p in sorted(shards.glob("*.tar"))]
    members = [m for blob in blobs for m in tar_members(io.BytesIO(blob), "bench")]
    npys = [data for name, data in members if name.endswith(".npy")]
    samples = len(members) // 4
    assert all(tarfile_members(b) == list(tar_members(io.BytesIO(b), "b")) == webdataset_members(b) for b in blobs)
    assert all(np.array_equal(load_npy(d), numpy_npy(d)) for d in npys)

    reads = best(
        {
            "tar_members (ours)": lambda: [list(tar_members(io.BytesIO(b), "b")) for b in blobs],
            "tarfile, mode r|": lambda: [tarfile_members(b) for b in blobs],
            "webdataset tar_file_iterator": lambda: [webdataset_members(b) for b in blobs],
            "load_npy (ours)": lambda: [load_npy(d) for d in npys],
            "np.lib.format.read_array": lambda: [numpy_npy(d) for d in npys],
            "sample: iter_members + decode_compact": lambda: [our_samples(b) for b in blobs],
            "sample: tarfile + read_array": lambda: [library_samples(b) for b in blobs],
            "ustar_header (ours)": lambda: [ustar_header(n, len(d)) for n, d in members],
            "tarfile TarInfo.tobuf": lambda: [tarfile_header(n, len(d)) for n, d in members],
        },
        args.rounds,
    )
    pairs = [
        ("tar read", "tar_members (ours)", ["tarfile, mode r|", "webdataset tar_file_iterator"], samples),
        (".npy decode", "load_npy (ours)", ["np.lib.format.read_array"], samples),
        ("whole sample", "sample: iter_members + decode_compact", ["sample: tarfile + read_array"], samples),
        ("tar header", "ustar_header (ours)", ["tarfile TarInfo.tobuf"], samples),
    ]
    mb = sum(map(len, blobs)) / 1e6
    print(
        f"{len(blobs)} shards, {samples} samples, {len(members)} members ({len(npys)} .npy), {mb:.1f} MB in memory; "
        f"best of {args.rounds} rounds"
    )
    print(f"{'row':<14}{'method':<40}{'us a sample':>12}{'x ours':>9}")
    for row, ours, others, n in pairs:
        for name in [ours, *others]:
            print(f"{row:<14}{name:<40}{reads[name] / n * 1e6:>12.1f}{reads[name] / reads[ours]:>8.2f}x")

    ours_shard = b"".join(b for n, d in members[:40] for b in member_blocks(n, d)) + bytes(1024)
    theirs = tarfile_shard(members[:40])
    headers_equal = all(ustar_header(n, len(d)) == tarfile_header(n, len(d)) for n, d in members[:40])
    print(
        f"tarfile headers equal to the shards' headers: {headers_equal}; whole archive equal: "
        f"{theirs == ours_shard} ({len(theirs)} vs {len(ours_shard)} bytes); tarfile deterministic run to run: "
        f"{tarfile_shard(members[:40]) == theirs}"
    )
    if not headers_equal:
        name, size = members[0][0], len(members[0][1])
        h_ours, h_lib = ustar_header(name, size), tarfile_header(name, size)
        fields = {(0, 100): "name", (329, 337): "devmajor", (337, 345): "devminor", (148, 156): "chksum"}
        print("  fields that differ: " + ", ".join(f for (a, b), f in fields.items() if h_ours[a:b] != h_lib[a:b]))


if __name__ == "__main__":
    main()
