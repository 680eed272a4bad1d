"""Cross-validation: which folds to run and where each stands, and the report of their out-of-fold predictions.

The report is built from one table, one row per validated sample (`OOF_COLUMNS`): the best.pt of the
fold that held the sample out, its top-k signs and probabilities. From it come `cv.json` (per fold,
mean and std over folds, per participant, per sign), `oof.csv` (the table itself) and a one-screen
summary. The std over folds is the population std (ddof 0): the folds are the whole set being
described, not a sample of folds, and one fold gives 0 rather than undefined.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from pipeline.errors import AslError
from pipeline.files import write_atomic, write_json_atomic
from pipeline.shards import read_manifest
from pipeline.text import printable

if TYPE_CHECKING:
    from train.config import TrainConfig

log = logging.getLogger(__name__)

TOP_K = 5
ID_COLUMNS = ("sequence_id", "participant_id", "fold", "sign")
CV_JSON, OOF_CSV = "cv.json", "oof.csv"
NEW, RESUMABLE, FINISHED = "new", "resumable", "finished"


def top_columns(k: int = TOP_K) -> list[str]:
    """`pred_1, p_1, ..., pred_k, p_k`: the k best signs, best first, each with its probability."""
    return [c for i in range(1, k + 1) for c in (f"pred_{i}", f"p_{i}")]


OOF_COLUMNS = (*ID_COLUMNS, *top_columns())


class CvError(AslError, ValueError):
    """A cross-validation that cannot run or a table that cannot be its report; the message says why."""


# ---------------------------------------------------------------------------- which folds


def manifest_folds(manifest: dict[str, Any]) -> list[int]:
    """The folds of a manifest that hold samples, in order."""
    return sorted(f["fold"] for f in manifest["folds"] if f["samples"] > 0)


def cv_folds(manifest: dict[str, Any], shards: str, requested: Sequence[int] | None = None) -> list[int]:
    """The folds a cross-validation runs: `requested` (default all), checked against the manifest of `shards`.

    Shards with fewer than two non-empty folds cannot be cross-validated: no fold would be left to train on.
    """
    known = manifest_folds(manifest)
    if len(known) < 2:
        held = f"one fold ({known[0]})" if known else "no fold with samples"
        raise CvError(
            f"{shards}: cross-validation needs 2 or more folds, its manifest has {held}; "
            "rebuild the shards with --folds 5"
        )
    if requested is None:
        return known
    if unknown := [f for f in requested if f not in known]:
        raise CvError(
            f"--folds {','.join(map(str, unknown))}: not in the manifest of {shards}, "
            f"which has folds {','.join(map(str, known))}"
        )
    return list(requested)


def fold_dir(out: str | Path, fold: int) -> Path:
    """The run directory of fold `fold` in a cross-validation's `out`."""
    return Path(out) / f"fold{fold}"


def fold_state(run: str | Path, epochs: int, max_steps: int | None = None) -> str:
    """Where a fold's run directory stands: NEW (no last.pt), RESUMABLE (last.pt short of the planned
    length) or FINISHED (last.pt at the end of `epochs`, or at `max_steps`; best.pt beside it).

    The checkpoint, not metrics.jsonl, decides: an epoch's metrics line is written before its last.pt,
    so a kill between the two leaves a line for an epoch the checkpoint does not hold.
    """
    from train.checkpoint import load_checkpoint  # torch: only when a fold directory is inspected

    run = Path(run)
    if not (run / "last.pt").exists():
        return NEW
    ckpt = load_checkpoint(run / "last.pt")
    epoch, step, mid = ckpt.get("epoch"), ckpt.get("step"), ckpt.get("batch_in_epoch")
    if not all(type(v) is int for v in (epoch, step, mid)):
        raise CvError(f"{run / 'last.pt'}: holds no training position (epoch, step); not a resumable run")
    if not ((epoch >= epochs and mid == 0) or (max_steps is not None and step >= max_steps)):
        return RESUMABLE
    if not (run / "best.pt").exists():
        raise CvError(
            f"{run}: last.pt has finished (epoch {epoch}) but best.pt is missing; "
            "remove the directory to train this fold again"
        )
    return FINISHED


# ---------------------------------------------------------------------------- the out-of-fold table


def predictions_table(
    samples: pl.DataFrame, probabilities: np.ndarray, label_map: dict[str, int], k: int = TOP_K
) -> pl.DataFrame:
    """The out-of-fold table: `samples` (ID_COLUMNS, one row per sample) with its rows' top-k signs.

    `probabilities` is (N, n_signs), row i for sample i; ties rank the lower label index first.
    Fewer than k signs leave the last columns null.
    """
    if probabilities.shape != (samples.height, len(label_map)):
        raise CvError(f"probabilities of shape {probabilities.shape}; expected ({samples.height}, {len(label_map)})")
    names = np.array(sorted(label_map, key=label_map.get), dtype=object)
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]  # (N, k)
    top = {}
    for i in range(k):
        have = i < order.shape[1]
        top[f"pred_{i + 1}"] = pl.Series(
            names[order[:, i]].tolist() if have else [None] * samples.height, dtype=pl.String
        )
        probs = np.take_along_axis(probabilities, order[:, i : i + 1], axis=1)[:, 0] if have else None
        top[f"p_{i + 1}"] = pl.Series(probs.astype(np.float64) if have else [None] * samples.height, dtype=pl.Float64)
    return samples.select(ID_COLUMNS).with_columns(**top)


def checked_oof(oof: pl.DataFrame) -> pl.DataFrame:
    """`oof` with OOF_COLUMNS in order, sorted by fold and sequence_id; one line for a table that cannot be one."""
    if absent := [c for c in OOF_COLUMNS if c not in oof.columns]:
        raise CvError(f"out-of-fold table lacks column(s) {', '.join(absent)}")
    if oof.height == 0:
        raise CvError("out-of-fold table has no rows")
    if (dup := oof.filter(pl.col("sequence_id").is_duplicated())).height:
        raise CvError(f"out-of-fold table holds sequence {dup['sequence_id'][0]} twice (one row per sample)")
    return oof.select(OOF_COLUMNS).sort("fold", "sequence_id")


def _hits(oof: pl.DataFrame) -> pl.DataFrame:
    """`oof` with boolean `hit1` (pred_1 is the sign) and `hit5` (one of the top k is)."""
    in_top = pl.any_horizontal([(pl.col(f"pred_{i}") == pl.col("sign")).fill_null(False) for i in range(1, TOP_K + 1)])
    return oof.with_columns(hit1=(pl.col("pred_1") == pl.col("sign")).fill_null(False), hit5=in_top)


def _groups(hits: pl.DataFrame, key: str) -> dict[str, dict[str, Any]]:
    table = hits.group_by(key).agg(top1=pl.col("hit1").mean(), samples=pl.len()).sort(key)
    return {str(row[key]): {"top1": row["top1"], "samples": row["samples"]} for row in table.iter_rows(named=True)}


def cv_report(oof: pl.DataFrame) -> dict[str, Any]:
    """The cv.json content of an out-of-fold table: per fold, mean and population std over folds, per
    participant and per sign (top-1 and samples)."""
    hits = _hits(checked_oof(oof))
    per_fold = hits.group_by("fold").agg(top1=pl.col("hit1").mean(), top5=pl.col("hit5").mean(), samples=pl.len())
    per_fold = per_fold.sort("fold")
    spread = per_fold.select(
        top1_mean=pl.col("top1").mean(), top1_std=pl.col("top1").std(ddof=0), top5_mean=pl.col("top5").mean()
    ).row(0, named=True)
    return {
        "folds": per_fold.select("fold", "top1", "top5", "samples").to_dicts(),
        **spread,
        "participants": _groups(hits, "participant_id"),
        "signs": _groups(hits, "sign"),
    }


def summary_text(report: dict[str, Any], worst: int = 5) -> str:
    """One screen: per-fold top-1 and top-5, mean ± std, the `worst` participants and signs by top-1."""
    folds = report["folds"]
    lines = [
        f"cross-validation over {len(folds)} fold(s), {sum(f['samples'] for f in folds)} samples",
        "fold  samples  top-1  top-5",
    ]
    lines += [f"{f['fold']:>4}  {f['samples']:>7}  {f['top1']:.4f}  {f['top5']:.4f}" for f in folds]
    lines.append(
        f"top-1 {report['top1_mean']:.4f} ± {report['top1_std']:.4f} (mean ± population std over folds), "
        f"top-5 {report['top5_mean']:.4f}"
    )
    for title, groups in (("participants", report["participants"]), ("signs", report["signs"])):
        lowest = sorted(groups.items(), key=lambda kv: (kv[1]["top1"], kv[0]))[:worst]
        named = ", ".join(f"{printable(k, 60)} {v['top1']:.3f} (n={v['samples']})" for k, v in lowest)
        lines.append(f"worst {title}: {named}")
    return "\n".join(lines)


def write_cv(out: str | Path, oof: pl.DataFrame) -> dict[str, Any]:
    """Write `out/oof.csv` and `out/cv.json` (each atomically) from an out-of-fold table; the report."""
    out = Path(out)
    oof = checked_oof(oof)
    report = cv_report(oof)
    write_atomic(out / OOF_CSV, oof.write_csv().encode())
    write_json_atomic(out / CV_JSON, report)
    return report


def read_oof(path: str | Path) -> pl.DataFrame:
    """An oof.csv as written by `write_cv` (ids as strings, probabilities as floats)."""
    schema = {**_id_schema(), **{c: pl.String if c.startswith("pred_") else pl.Float64 for c in top_columns()}}
    try:
        return pl.read_csv(path, schema=schema)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise CvError(f"{path}: not an out-of-fold table ({str(exc).splitlines()[0][:200]})") from None


def _id_schema() -> dict[str, pl.DataType]:
    return {"sequence_id": pl.String, "participant_id": pl.String, "fold": pl.Int64, "sign": pl.String}


# ---------------------------------------------------------------------------- the runs


def run_cv(
    cfg: TrainConfig, folds: Sequence[int] | None = None, echo: Callable[[str], None] = log.info
) -> dict[str, Any] | None:
    """Cross-validate: for each fold k, a run in `cfg.out`/fold{k} validated on fold k and trained on the others,
    one after the other; then its best.pt scored on fold k as `evaluate` scores it.

    A rerun continues: finished folds are kept (their options must be this run's, as for --resume), an
    interrupted one resumes from its last.pt. After each fold rank 0 writes cv.json and oof.csv over the
    folds finished so far and `echo`es the summary; every rank trains (under torchrun). Returns the
    report on rank 0, None on the others.
    """
    from train.checkpoint import check_resumable, stored_config
    from train.distributed import first_error, setup_distributed
    from train.loop import train

    manifest = read_manifest(cfg.shards)
    chosen = cv_folds(manifest, cfg.shards, folds)
    out, report, tables = Path(cfg.out), None, []
    kept = finished_folds(out, [k for k in manifest_folds(manifest) if k not in chosen], cfg)
    _, rank, world = setup_distributed(cfg.device)  # every rank agrees on each fold's report before the next
    error = None
    if rank == 0:
        try:  # an earlier run's finished folds stay in cv.json, scored again as evaluate scores them
            tables = [fold_predictions(fold_dir(out, k) / "best.pt", k, cfg.shards, cfg.device) for k in kept]
        except (AslError, OSError) as exc:
            error = str(exc)
    if (error := first_error(error, world)) is not None:
        raise CvError(error)
    for k in chosen:
        run = fold_dir(out, k)
        fold_cfg = replace(cfg, out=str(run), val_folds=[k])
        state = fold_state(run, cfg.epochs, cfg.max_steps)
        if state != NEW:
            check_resumable(run, stored_config(run), fold_cfg)
        if state != FINISHED:
            log.info("fold %d of %s: %s", k, ",".join(map(str, chosen)), "resumed" if state == RESUMABLE else "new")
            train(fold_cfg, resume=run if state == RESUMABLE else None)
        error = None
        if rank == 0:
            try:
                tables.append(fold_predictions(run / "best.pt", k, cfg.shards, cfg.device))
                report = write_cv(out, pl.concat(tables))
                echo(summary_text(report))
            except (AslError, OSError) as exc:
                error = str(exc)
        if (error := first_error(error, world)) is not None:
            raise CvError(error)
    return report


def finished_folds(out: Path, folds: Sequence[int], cfg: TrainConfig) -> list[int]:
    """Which of `folds`, not run by this command, an earlier run finished in `out` with these options (their report
    stays in cv.json); a fold left short of `cfg.epochs` is named in the log and left out."""
    from train.checkpoint import check_resumable, stored_config

    kept = []
    for k in folds:
        run = fold_dir(out, k)
        state = fold_state(run, cfg.epochs, cfg.max_steps)
        if state == RESUMABLE:
            log.warning(
                "%s is not finished at --epochs %d: left out of cv.json (--folds %d finishes it)", run, cfg.epochs, k
            )
        elif state == FINISHED:
            check_resumable(run, stored_config(run), replace(cfg, out=str(run), val_folds=[k]))
            kept.append(k)
    return kept


def fold_predictions(checkpoint: str | Path, fold: int, shards: str, device: str = "auto") -> pl.DataFrame:
    """The out-of-fold rows of one fold: `checkpoint` scored on `fold` in the batches `evaluate` forms."""
    from train.scoring import evaluation_scores

    scores, members, _ = evaluation_scores(checkpoint, shards, [fold], device)
    names = np.array(sorted(members.label_map, key=members.label_map.get), dtype=object)
    samples = pl.DataFrame(
        {
            "sequence_id": scores.keys,
            "participant_id": scores.participants,
            "fold": [fold] * len(scores.keys),
            "sign": names[scores.labels].tolist(),
        },
        schema=_id_schema(),
    )
    return predictions_table(samples, scores.probabilities, members.label_map)
