"""Checkpoints: written atomically, loaded with `weights_only=True` and checked; init-from; the resume rule.

A checkpoint is a dict: `model`, `config` (asdict of the run's TrainConfig) and `label_map` always;
`optimizer`, `scheduler`, `ema`, `step`, `epoch`, `batch_in_epoch`, `best_top1`, `rng` (and more)
in those the training loop writes, which a resumed run needs.
"""

from __future__ import annotations

import contextlib
import io
import math
import pickle
import pickletools
import re
import signal
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import torch

from pipeline.errors import AslError
from pipeline.files import write_atomic
from pipeline.read import InputFileError, read_file
from pipeline.text import printable
from train.config import MODEL_BOUNDS, ConfigError, OptionsError, TrainConfig, checked_model_config, fixed_options
from train.model import SignModel

# What every checkpoint holds, and what a resume needs on top.
CHECKPOINT_KEYS = ("model", "config", "label_map")
RESUME_KEYS = ("optimizer", "scheduler", "ema", "step", "epoch", "batch_in_epoch", "best_top1", "rng")
# Model options that change neither the weights' shapes nor the evaluated function: a fine-tune may change them.
REGULARIZATION = ("dropout", "drop_path", "attn_dropout")

# The gate before unpickling. A checkpoint of the default preset is ~30 MB and its pickle ~40 KB, holding
# ~10^4 objects at most 8 deep; these limits are far above any checkpoint of this project, and far below
# what takes long to unpickle or walk. `weights_only` alone refuses code, not work: a few hundred bytes of
# tuples sharing each other, used as a dict key, make its unpickler hash 2^n objects.
MAX_CHECKPOINT_BYTES = 8 << 30
MAX_PICKLE_BYTES = 64 << 20
MAX_PICKLE_OBJECTS = 10_000_000  # objects of the pickle with every shared one counted wherever it is used
MAX_PICKLE_DEPTH = 64
# A default-preset last.pt (model, EMA, optimizer state) has ~15,000 opcodes and ~900 tensors: the budgets bound
# the scan's time and what a state dict of millions of keys would cost torch to unpickle and the model to check.
MAX_PICKLE_OPS = 2_000_000
MAX_TENSORS = 100_000
# The globals torch.save writes for the dicts of tensors and numbers a checkpoint holds (any torch.*Storage too);
# torch's own `weights_only` allowlist is wider, and its list is not public API.
REBUILD_TENSOR = "torch._utils._rebuild_tensor_v2"
TORCH_GLOBALS = frozenset({"collections.OrderedDict", REBUILD_TENSOR})
# The members torch.save writes under the archive's one top-level folder.
MEMBER = re.compile(r"(data\.pkl|version|byteorder|\.format_version|\.storage_alignment|\.data/[\w.]+|data/\w+)")
# Opcodes that change an object already on the stack: a pickler applies them only to the object it just made.
MUTATORS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}


class CheckpointError(AslError, ValueError):
    """A file that is not a usable asl-train checkpoint; the message names it and says why, in one line."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: not an asl-train checkpoint: {reason}")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialize in memory, then the pipeline's atomic write: a kill never leaves a half-written file."""
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint loaded with `weights_only=True` and checked: its model can be built and takes its weights.

    Before unpickling, the file's structure passes `checked_archive`; before any model is built, its
    stored config and label map pass `check_stored`. Anything else (an empty, truncated or foreign
    file, or one holding Python objects, which `weights_only` refuses to unpickle) is a CheckpointError.
    """
    ckpt = _unpickled(path, checked_archive(path), map_location)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        # only short string keys are named: printing or sorting arbitrary keys can take unbounded time
        have = sorted(k for k in ckpt if isinstance(k, str) and len(k) < 40)[:8] if isinstance(ckpt, dict) else None
        have = f"keys {have}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(path, f"expected a dict with {', '.join(CHECKPOINT_KEYS)}; found {have}")
    check_stored(path, ckpt)
    try:
        model_from_checkpoint(ckpt)
    except Exception as exc:  # a config the model cannot take, weights of other shapes or names
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(path, f"its weights do not fit the model its config describes ({first})") from None
    return ckpt


def checked_archive(path: str | Path) -> io.BytesIO:
    """The checkpoint rebuilt from exactly the members the gate read: its zip layout checked, its pickle scanned.

    The file is read once through the pipeline's input gate (a regular file, opened without blocking,
    of at most MAX_CHECKPOINT_BYTES); the members torch writes, uncompressed, in one folder, each name once.
    torch then loads the rebuilt archive, so what it unpickles is the pickle `scan_pickle` accepted,
    whatever another zip reader would have made of the file.
    """
    try:
        data = read_file(path, MAX_CHECKPOINT_BYTES)
    except InputFileError as exc:
        raise CheckpointError(path, exc.reason.removesuffix(" (--max-file-mb)")) from None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            members = _torch_members(path, z.infolist(), len(data))
            scan_pickle(path, z.read(members["data.pkl"]))
            out = io.BytesIO()
            with zipfile.ZipFile(out, "w") as rebuilt:
                for m in members.values():
                    rebuilt.writestr(m.filename, z.read(m))  # zipfile checks each member's CRC
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as exc:
        raise CheckpointError(path, f"empty, truncated or not a torch file ({type(exc).__name__})") from None
    out.seek(0)
    return out


def _torch_members(path: str | Path, members: list[zipfile.ZipInfo], size: int) -> dict[str, zipfile.ZipInfo]:
    """The archive's members by their name inside its one folder, once they are torch's, stored, named once, and
    fit in the file; a data.pkl among them of at most MAX_PICKLE_BYTES."""
    folders = {m.filename.split("/", 1)[0] for m in members}
    if len(folders) != 1:
        raise CheckpointError(path, f"its members lie in {len(folders)} folders, not one")
    folder = folders.pop()
    named: dict[str, zipfile.ZipInfo] = {}
    for m in members:
        name = m.filename[len(folder) + 1 :]
        if not MEMBER.fullmatch(name):
            raise CheckpointError(path, f"a member torch does not write: {printable(m.filename, 100)!r}")
        if m.compress_type != zipfile.ZIP_STORED or m.file_size > size:
            raise CheckpointError(path, f"member {printable(m.filename, 100)!r} is compressed or larger than the file")
        if name in named:  # zip readers differ in which of two same-named members they take
            raise CheckpointError(path, f"member {printable(m.filename, 100)!r} appears twice")
        named[name] = m
    pkl = named.get("data.pkl")
    if pkl is None:
        raise CheckpointError(path, "no data.pkl in the archive")
    if pkl.file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(path, f"its pickle of {pkl.file_size:,} bytes is over the limit of {MAX_PICKLE_BYTES:,}")
    return named


class _Node:
    """What the scan knows of an object on the unpickler's stack: its size with every shared part counted
    wherever it is used, its nesting depth, whether a memo get has shared it, and its value if a string."""

    __slots__ = ("depth", "shared", "size", "value")

    def __init__(self, size: int = 1, depth: int = 0, value: Any = None) -> None:
        self.size, self.depth, self.shared, self.value = size, depth, False, value


class _Stack:
    """The unpickler's stack as the scan models it, with the positions of its MARKs, so that popping to a mark
    costs what it pops (finding the mark by a search from the top made a pickle of many objects and then many
    MARK, POP_MARK pairs quadratic); `work` counts the opcodes and the entries moved."""

    def __init__(self) -> None:
        self.items: list[_Node | None] = []  # None: a MARK
        self.marks: list[int] = []
        self.work = 0

    def push(self, node: _Node | None) -> None:
        if node is None:
            self.marks.append(len(self.items))
        self.items.append(node)

    def pop(self) -> _Node:
        node = self.items.pop()
        if node is None:
            raise ValueError("a MARK where an object was expected")
        self.work += 1
        return node

    def top(self) -> _Node:
        node = self.items[-1]
        if node is None:
            raise ValueError("a MARK where an object was expected")
        return node

    def pop_to_mark(self) -> list[_Node]:
        i = self.marks.pop()
        popped = self.items[i + 1 :]
        del self.items[i:]
        self.work += len(popped) + 1
        return popped  # type: ignore[return-value]


def scan_pickle(path: str | Path, data: bytes) -> int:
    """Refuse a pickle that would run code or take long to unpickle or walk, without unpickling it; the work done.

    Walks the opcodes on a model of the unpickler's stack and memo, in time linear in the pickle's size:
    globals outside TORCH_GLOBALS, more than MAX_PICKLE_OPS opcodes or MAX_TENSORS tensors, objects
    nesting deeper than MAX_PICKLE_DEPTH, more than MAX_PICKLE_OBJECTS objects in all (shared ones counted
    each time they are used: the work of hashing, comparing or printing them), and shared objects changed
    after being shared (no pickler writes that) are refused. The work returned counts the opcodes read
    and the stack entries moved: at most a small multiple of the opcodes.
    """
    stack = _Stack()
    memo: dict[int, _Node] = {}
    total = ops = tensors = 0
    try:
        for op, arg, _ in pickletools.genops(data):
            ops += 1
            stack.work += 1
            if ops > MAX_PICKLE_OPS:
                raise CheckpointError(
                    path, f"its pickle has more than {MAX_PICKLE_OPS:,} opcodes (a checkpoint of this project: ~15,000)"
                )
            name = op.name
            if name in ("GLOBAL", "STACK_GLOBAL", "INST"):
                module, attr = arg.split(" ", 1) if name != "STACK_GLOBAL" else _popped_strings(stack, 2)
                if not _allowed(module, attr):
                    named = f"{printable(str(module), 60)}.{printable(str(attr), 60)}"
                    raise CheckpointError(
                        path,
                        f"it holds Python objects besides tensors and plain data ({named}; "
                        "refused: unpickling them could run code)",
                    )
                if name != "INST":
                    stack.push(_Node(value=f"{module}.{attr}"))
                    continue
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if name == "MEMOIZE" else arg] = stack.top()
                continue
            if name in ("GET", "BINGET", "LONG_BINGET", "DUP"):
                node = stack.top() if name == "DUP" else memo[arg]
                node.shared = True
                total += node.size
                stack.push(node)
            elif name in ("MARK", "PROTO", "FRAME", "STOP"):
                if name == "MARK":
                    stack.push(None)
                continue
            elif name == "POP_MARK":
                stack.pop_to_mark()
                continue
            else:
                children = _popped(op, stack)
                tensors += name == "REDUCE" and children[-1].value == REBUILD_TENSOR
                if tensors > MAX_TENSORS:
                    raise CheckpointError(path, f"it holds more than {MAX_TENSORS:,} tensors")
                if name in MUTATORS:
                    target = stack.top()
                    if target.shared:
                        raise CheckpointError(path, "it changes an object after sharing it (not written by torch)")
                else:
                    target = _Node(value=arg if isinstance(arg, str) and len(arg) < 256 else None)
                    stack.push(target)
                if len(op.stack_after) == 0:
                    stack.pop()
                    continue
                target.size += sum(c.size for c in children)
                target.depth = max([target.depth, *(c.depth + 1 for c in children)])
                total += 1
            if total > MAX_PICKLE_OBJECTS or stack.top().depth > MAX_PICKLE_DEPTH:
                raise CheckpointError(
                    path,
                    f"its pickle holds more than {MAX_PICKLE_OBJECTS:,} objects (shared "
                    f"ones counted where used) or nests deeper than {MAX_PICKLE_DEPTH}",
                )
    except CheckpointError:
        raise
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:  # ill-formed opcodes or stack
        raise CheckpointError(path, f"not a well-formed pickle ({type(exc).__name__})") from None
    return stack.work


def _allowed(module: Any, attr: Any) -> bool:
    """Whether a global is one torch.save writes for this project's checkpoints (tensors and their storages)."""
    return f"{module}.{attr}" in TORCH_GLOBALS or (module == "torch" and str(attr).endswith("Storage"))


def _popped(op: pickletools.OpcodeInfo, stack: _Stack) -> list[_Node]:
    """Pop what `op` consumes (besides a target it changes in place); the popped nodes."""
    before = op.stack_before
    items: list[_Node] = []
    if pickletools.markobject in before:
        items = stack.pop_to_mark()
        before = before[: before.index(pickletools.markobject)]
    keep = 1 if op.name in MUTATORS else 0  # the object changed stays on the stack
    items.extend(stack.pop() for _ in range(len(before) - keep))
    return items


def _popped_strings(stack: _Stack, n: int) -> list[str]:
    nodes = [stack.pop() for _ in range(n)][::-1]
    if any(not isinstance(node.value, str) for node in nodes):
        raise ValueError("STACK_GLOBAL of something other than two strings")
    return [node.value for node in nodes]


@contextlib.contextmanager
def _signals_stop_at_once() -> Iterator[None]:
    """SIGTERM and SIGINT end the process at once while torch unpickles: a Python handler (the command lines
    install one) would wait for torch's C code to return. Loading writes nothing, so nothing is lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ignored = {s for s in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(s) == signal.SIG_IGN}  # stay so
    previous = {s: signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGINT) if s not in ignored}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _unpickled(path: str | Path, archive: IO[bytes], map_location: str | torch.device) -> Any:
    """torch.load with `weights_only=True` of what `checked_archive` rebuilt; its failures as CheckpointError."""
    try:
        with _signals_stop_at_once():
            return torch.load(archive, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = "empty, truncated or not a torch file (UnpicklingError)"
        if "GLOBAL" in str(exc):  # weights_only met a class or function to import: the file would run code
            reason = "it holds Python objects besides tensors and plain data (refused: unpickling them could run code)"
        raise CheckpointError(path, reason) from None
    except Exception as exc:  # torch raises EOFError, RuntimeError, KeyError... for files that are not its own
        raise CheckpointError(path, f"empty, truncated or not a torch file ({type(exc).__name__})") from None


def check_stored(path: str | Path, ckpt: dict[str, Any]) -> None:
    """Refuse a stored config or label map that no model should be built from (before any is)."""
    labels, hi = ckpt["label_map"], MODEL_BOUNDS["n_classes"][1]
    if not isinstance(labels, dict) or not 1 <= len(labels) <= hi:
        raise CheckpointError(path, f"its label map is not a dict of 1 to {hi:,} signs")
    if not all(isinstance(k, str) for k in labels) or sorted(labels.values()) != list(range(len(labels))):
        raise CheckpointError(path, "its label map does not number its signs 0..n-1")
    if not isinstance(ckpt["config"], dict):
        raise CheckpointError(path, "its stored config is not a dict of options")
    try:
        cfg = TrainConfig.from_dict(ckpt["config"])
        cfg.check_values()
        checked_model_config(cfg.preset, len(labels), cfg.model)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(path, f"its stored config cannot be used ({str(exc)[:300]})") from None


def build_model(cfg: TrainConfig, n_classes: int) -> SignModel:
    """A freshly initialized model of the config's preset and overrides (refused unless within MODEL_BOUNDS);
    a model this machine cannot allocate is a ConfigError."""
    model_cfg = checked_model_config(cfg.preset, n_classes, cfg.model)
    try:
        return SignModel(model_cfg)
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError | torch.OutOfMemoryError) and "alloc" not in str(exc):
            raise  # not a failed allocation: a bug keeps its traceback
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"the {cfg.preset!r} model with overrides {cfg.model} cannot be allocated here ({first})"
        ) from None


def model_from_checkpoint(ckpt: dict[str, Any], use_ema: bool = True) -> SignModel:
    """The trained model of a checkpoint (its EMA weights when present and `use_ema`)."""
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model(cfg, len(ckpt["label_map"]))
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") else ckpt["model"]
    model.load_state_dict(weights)
    return model.eval()


def load_initial_weights(model: SignModel, path: str | Path, label_map: dict[str, int], new_head: bool) -> None:
    """Start `model` from another run's trained weights (its EMA weights when present: what evaluate scores).

    The architecture must match (regularization aside), and so must the label map unless `new_head`,
    which keeps this model's freshly initialized classifier.
    """
    ckpt = load_checkpoint(path)
    source = model_from_checkpoint(ckpt)
    theirs, ours = asdict(source.cfg), asdict(model.cfg)
    differ = [
        f"{k} {theirs[k]} (here {ours[k]})"
        for k in ours
        if k not in ("n_classes", *REGULARIZATION) and theirs[k] != ours[k]
    ]
    if differ:
        preset = TrainConfig.from_dict(ckpt["config"]).preset
        raise ConfigError(
            f"--init-from {path}: its {preset!r} model differs from this run's in {', '.join(differ)}; "
            f"pass --preset {preset} and the overrides it was trained with"
        )
    if ckpt["label_map"] != label_map and not new_head:
        theirs_n, ours_n = len(ckpt["label_map"]), len(label_map)
        raise ConfigError(
            f"--init-from {path}: it was trained with another label map ({theirs_n} signs; these "
            f"shards have {ours_n}); pass --new-head for a new classifier head"
        )
    weights = source.state_dict()
    if new_head:
        weights = {k: v for k, v in weights.items() if not k.startswith("classifier.")}
    model.load_state_dict(weights, strict=not new_head)


def stored_config(run: str | Path, ckpt: dict[str, Any] | None = None) -> TrainConfig:
    """The options the run in directory `run` was trained with (its last.pt's), its directory as `out`."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(Path(run) / "last.pt")
    return TrainConfig.from_dict({**ckpt["config"], "out": str(run)})


def check_resumable(run: str | Path, stored: TrainConfig, cfg: TrainConfig) -> None:
    """The resume rule: a resumed run keeps its options, but for how far it goes, what it logs, and where
    it reads its shards (`config.RESUMABLE`)."""
    if fixed := fixed_options(stored, cfg):
        raise OptionsError(
            f"--resume continues {run} with its stored options, so {', '.join(fixed)} cannot "
            f"change; to change them, start a new run from its weights with --init-from "
            f"{Path(run) / 'last.pt'}"
        )


def resume_checkpoint(run: str | Path, cfg: TrainConfig) -> dict[str, Any]:
    """The last.pt of `run`, checked: it holds the training state, and `cfg` keeps the options it must keep."""
    path = Path(run) / "last.pt"
    ckpt = load_checkpoint(path)
    if absent := [k for k in RESUME_KEYS if k not in ckpt]:
        raise CheckpointError(path, f"cannot resume without {', '.join(absent)}")
    check_resume_state(path, ckpt)
    check_resumable(run, stored_config(run, ckpt), cfg)
    return ckpt


class ResumeError(CheckpointError):
    """A last.pt whose training state cannot be continued; the message names the file and the field."""

    def __init__(self, path: str | Path, field: str, reason: str) -> None:
        AslError.__init__(self, f"{path}: cannot resume from it: {field} {reason}")


def _whole(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _shown(value: Any) -> str:
    return printable(repr(value), 60)


def check_resume_state(path: str | Path, ckpt: dict[str, Any]) -> None:
    """Refuse a last.pt whose position, scores or state of the optimizer, schedule and RNGs are not what the
    training loop writes (types, ranges, finiteness, sizes), before any of it is used."""
    epochs = TrainConfig.from_dict(ckpt["config"]).epochs
    step, epoch, batch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
    if not _whole(step, 0, MAX_STEPS):
        raise ResumeError(path, "step", f"is {_shown(step)}, not a whole number in [0, {MAX_STEPS:,}]")
    if not _whole(epoch, 0, min(epochs, step)):
        raise ResumeError(path, "epoch", f"is {_shown(epoch)}, not a whole number in [0, {min(epochs, step)}]")
    if not _whole(batch, 0, step):
        raise ResumeError(path, "batch_in_epoch", f"is {_shown(batch)}, not a whole number in [0, step {step}]")
    best = ckpt["best_top1"]
    if not isinstance(best, float | int) or isinstance(best, bool) or not (best == -1 or 0 <= best <= 1):
        raise ResumeError(path, "best_top1", f"is {_shown(best)}, not a top-1 in [0, 1] (or -1: none yet)")
    sums = ckpt.get("epoch_sums", [0.0, 0.0])
    if not (isinstance(sums, list) and len(sums) == 2 and all(_finite_at_least_0(s) for s in sums)):
        raise ResumeError(path, "epoch_sums", f"is {_shown(sums)}, not two finite sums >= 0")
    for name in ("world", "workers", "ema_n_averaged"):
        if name in ckpt and not _whole(ckpt[name], 1 if name == "world" else 0, MAX_STEPS):
            raise ResumeError(path, name, f"is {_shown(ckpt[name])}, not a whole number in range")
    rng = ckpt["rng"]
    if not (isinstance(rng, list) and 1 <= len(rng) <= 1 << 16 and all(_rng_state(r) for r in rng)):
        raise ResumeError(path, "rng", "is not a list of each rank's RNG states (uint8 tensors)")
    trained = ckpt.get("epoch_trained")
    if trained is not None and not (isinstance(trained, torch.Tensor) and trained.dtype == torch.uint8):
        raise ResumeError(path, "epoch_trained", "is not a uint8 tensor")
    if not isinstance(ckpt["optimizer"], dict):  # its keys are the optimizer's (Lookahead nests another's)
        raise ResumeError(path, "optimizer", "state is not a dict")
    keys = ("last_epoch", "base_lrs")
    if not isinstance(ckpt["scheduler"], dict) or any(k not in ckpt["scheduler"] for k in keys):
        raise ResumeError(path, "scheduler", f"state is not a dict with {', '.join(keys)}")
    if ckpt["ema"] is not None and not isinstance(ckpt["ema"], dict):
        raise ResumeError(path, "ema", "is neither weights nor None")


MAX_STEPS = 1 << 40  # far above any run; below what overflows a float's exact integers


def _finite_at_least_0(value: Any) -> bool:
    return isinstance(value, float | int) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _rng_state(state: Any) -> bool:
    return (
        isinstance(state, dict)
        and {"torch", "augment"} <= state.keys()
        and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 for t in state.values())
    )


def check_resume_fit(path: str | Path, ckpt: dict[str, Any], steps_per_epoch: int, resplit: bool, same: bool) -> None:
    """Refuse a position the data cannot hold: unless the epoch is resplit (its position then comes from the
    samples trained), the checkpoint's batch must lie inside the epoch; under the same ranks and workers as
    wrote it, its step must also be where its epoch and batch put it."""
    if resplit:
        return
    step, epoch, batch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
    if batch >= steps_per_epoch:
        raise ResumeError(path, "batch_in_epoch", f"is {batch}, past the epoch's end ({steps_per_epoch} batches)")
    if same and step != epoch * steps_per_epoch + batch:
        raise ResumeError(
            path, "step", f"is {step}, not epoch {epoch} x {steps_per_epoch} batches + batch_in_epoch {batch}"
        )


def restored(path: str | Path, field: str, load: Any, state: Any) -> None:
    """`load(state)` (a load_state_dict), any failure of it one line naming the file and the field."""
    try:
        load(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ResumeError(path, field, f"does not fit this run ({printable(first, 200)})") from None


def check_optimizer_fit(path: str | Path, optimizer: torch.optim.Optimizer) -> None:
    """After the optimizer took its state: every per-weight tensor has its weight's shape and is finite (in an
    optimizer it wraps too, as Lookahead wraps RAdam)."""
    if isinstance(inner := getattr(optimizer, "inner", None), torch.optim.Optimizer):
        check_optimizer_fit(path, inner)
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor) or value.dim() == 0:
                    continue
                if value.shape != p.shape or not torch.isfinite(value).all():
                    raise ResumeError(
                        path,
                        "optimizer",
                        f"state {printable(str(key), 40)!r} of a weight of shape {tuple(p.shape)} is "
                        f"{tuple(value.shape)} or not finite",
                    )
