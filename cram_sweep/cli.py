"""`cram-sweep run | resume | status | report | decode | bench`."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from .config import compose, load_sweep_config, result_config, to_sweep_config, to_yaml, with_runtime_overrides
from .errors import StoreError, UserError, one_line
from .redact import redact, redact_record
from .results.store import SweepDir, write_atomically
from .sweep import interrupt


def _write_config(sweep: SweepDir, cfg) -> None:
    """sweep.yaml: the resolved config with the secrets of its URIs masked (a resume takes them from the environment)."""
    try:
        write_atomically(sweep.config, lambda tmp: tmp.write_text(redact(to_yaml(cfg))))
    except OSError as err:
        raise StoreError(f"cannot write {sweep.config} ({err.strerror}): free space or fix the permissions of {sweep.path}") from None


def _check_models(cfg) -> None:
    """Read every model's config and tokenizer before any work: a broken path or file is bad input (exit 2)."""
    from .engine.model import load_tokenizer, model_shape

    for name in cfg.grid.models:
        try:
            model_shape(name, cfg.models[name])
            load_tokenizer(name, cfg.models[name])
        except UserError:
            raise
        except Exception as err:  # e.g. a .gguf that is not a model fails inside the gguf parser
            raise UserError(
                f"model {name}: cannot load it from {cfg.models[name].path!r} ({type(err).__name__}: {one_line(err, 150)}): "
                f"fix models.{name}.path / models.{name}.gguf_file"
            ) from None


def _check_out_dir(out_dir: str) -> None:
    """`out_dir` can hold a sweep directory: it is a directory (or can be made one) that this user can write in."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"out_dir={out_dir} is a file, not a directory: give out_dir=DIR, a directory to hold the sweep")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"out_dir={out_dir} cannot be created ({err.strerror}): give out_dir=DIR somewhere you can write") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"out_dir={out_dir} is not writable by this user: give out_dir=DIR somewhere you can write, or fix its permissions")


def _finish(cfg, sweep: SweepDir, tokens, starts) -> int:
    from .sweep.orchestrate import run_sweep

    code = run_sweep(cfg, sweep, tokens, starts)
    print_status(sweep, seconds=True)
    if cfg.report:
        publish_report(sweep, cfg)
    if code:
        print(f"some samples failed: see `cram-sweep status {sweep.path}`, then `cram-sweep resume {sweep.path}`")
    return code


def cmd_run(overrides, show_config: bool) -> int:
    node = compose(overrides)
    if show_config:
        print(redact(to_yaml(node)), end="")
        return 0
    cfg = to_sweep_config(node)
    from .results.init_from import load_starts
    from .sweep.items import prepare_tokens

    _check_out_dir(cfg.out_dir)
    _check_models(cfg)
    tokens, starts = prepare_tokens(cfg), load_starts(cfg)
    sweep = SweepDir(Path(cfg.out_dir) / cfg.name)
    with sweep.lock():
        if sweep.config.is_file():
            if result_config(load_sweep_config(sweep.config)) != result_config(cfg):
                raise UserError(
                    f"{sweep.path} holds a different sweep named {cfg.name}: use `cram-sweep resume {sweep.path}` or another name="
                )
            print(f"{sweep.path} holds this sweep already: running its missing samples")
        _write_config(sweep, cfg)
        return _finish(cfg, sweep, tokens, starts)


def _rows(cfg):
    """The row count a sweep's workers run (layout.batch_rows), or `auto`."""
    from .engine.layout import batch_rows
    from .sweep.grid import rows_per_length

    return cfg.batch_size if cfg.batch_size == "auto" else batch_rows(cfg.batch_size, rows_per_length(cfg), cfg.batch_invariant)


def cmd_resume(path: str, overrides) -> int:
    sweep = SweepDir(path).require()
    stored = load_sweep_config(sweep.config)
    cfg = with_runtime_overrides(stored, overrides)
    if _rows(cfg) != _rows(stored):
        print(
            f"warning: batch_size={cfg.batch_size}, the sweep ran {stored.batch_size}: the rows run from now on have another "
            "row count in every product, which some kernels round differently (forward_rows records it; docs/determinism.md)",
            file=sys.stderr,
        )
    from .results.init_from import load_starts
    from .sweep.items import prepare_tokens

    _check_models(cfg)
    tokens, starts = prepare_tokens(cfg), load_starts(cfg)
    with sweep.lock():
        if overrides:
            _write_config(sweep, cfg)
        return _finish(cfg, sweep, tokens, starts)


def print_status(sweep: SweepDir, seconds: bool = False) -> int:
    from .report.build import cell_table
    from .report.markdown import fmt_value

    table = cell_table(sweep)
    width = max(len(c) for c in table["cell"])
    for row in table.to_dict("records"):
        line = f"{row['cell']:<{width}}  done {row['done']:>4}  failed {row['failed']:>3}  pending {row['pending']:>4}  mean acc {fmt_value(row['acc_mean'], '.3f'):>5}"
        line += f"  horizon {row['horizon_mean']:5.1f} (max {row['horizon_max']:.0f})"
        if seconds:
            line += f"  gain {row['gain_tokens_mean']:6.1f} tok  info gain {row['info_gain_bits_mean']:7.1f} bits  {row['seconds_mean']:.2f} s/sample"
        print(line)
    done, failed, pending = (int(table[k].sum()) for k in ("done", "failed", "pending"))
    print(f"total: {done} done, {failed} failed, {pending} pending")
    return 0 if failed == 0 and pending == 0 else 1


def cmd_status(path: str) -> int:
    from .results.cellstate import open_failures
    from .results.store import read_failures, read_results

    sweep = SweepDir(path).require()
    print_status(sweep)
    for row in open_failures(read_results(sweep, ["cell", "sample"]), read_failures(sweep)):
        restart = f" restart {row['restart']}" if row["restart"] else ""
        print(f"failed: {row['cell']} sample {row['sample']}{restart} (attempt {row['attempt']}): {row['error'][:300]}")
    return 0


def publish_report(sweep: SweepDir, cfg) -> None:
    """Write the report, re-sync the cells' MLflow metrics from the store and log the report to the sweep's
    parent run (MLflow failing loses no file). `cfg` is the sweep's config as this process holds it (real URIs)."""
    from .report.build import SweepRecords, build_report
    from .report.markdown import summary_lines
    from .tracking.tracker import Tracker

    records = SweepRecords.read(sweep, cfg)  # cfg: name and grid as in sweep.yaml (resume overrides change neither)
    report = build_report(sweep, records)
    print(f"report: {sweep.report / 'capacity.md'}")
    print("\n".join(summary_lines(report.capacity)))
    tracker = Tracker(cfg, sweep)
    try:
        tracker.start()
        tracker.record_cells(records.states)
        tracker.flush(force=True)
        tracker.report(report)
    except Exception as err:  # the files are written; MLflow can be re-synced with `report` later
        logging.getLogger("cram_sweep").warning(
            "report not logged to MLflow (%s): run `cram-sweep report %s` again", one_line(err, 200), sweep.path
        )


def cmd_report(path: str) -> int:
    sweep = SweepDir(path).require()
    publish_report(sweep, load_sweep_config(sweep.config))
    print((sweep.report / "capacity.md").read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cram-sweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a sweep: cram-sweep run [hydra overrides...]")
    run.add_argument("--cfg", choices=["job"], help="print the composed config and exit")
    run.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. 'grid.lengths=[16,32]' grid.samples=8")
    resume = sub.add_parser("resume", help="finish a sweep's missing or failed samples")
    resume.add_argument("sweep_dir")
    resume.add_argument("overrides", nargs="*", help="keys that do not change results, e.g. cluster.address=HOST:6379 batch_size=8")
    for name, text in (("status", "one line per cell"), ("report", "write and log the capacity report")):
        sub.add_parser(name, help=text).add_argument("sweep_dir")
    decode = sub.add_parser("decode", help="greedy-decode a stored sample from its vectors")
    decode.add_argument("sweep_dir")
    decode.add_argument("--cell", help="cell id as `status` prints it")
    decode.add_argument("--sample", type=int, default=0)
    decode.add_argument("--restart", type=int, default=0, help="which of the sample's restarts (grid.restarts)")
    decode.add_argument("--model")
    decode.add_argument("--dataset")
    decode.add_argument("--method", help="full or progressive, where the sweep has both")
    decode.add_argument("--length", type=int)
    decode.add_argument("--n-mem", type=int)
    bench = sub.add_parser("bench", help="throughput of the engine against the paper's one-sample loop")
    bench.add_argument("--model", default="smollm2", help="a name from conf/model/")
    bench.add_argument("--dataset", default="pydoc")
    bench.add_argument("--length", type=int, default=64)
    bench.add_argument("--n-mem", type=int, default=1)
    bench.add_argument("--steps", type=int, default=10, help="optimization steps per sample")
    bench.add_argument(
        "--batch-sizes",
        type=lambda s: [x if x == "auto" else int(x) for x in s.split(",")],
        default=[1, 8],
        help="comma-separated; auto: what a sweep would choose on this device",
    )
    bench.add_argument("--precisions", type=lambda s: s.split(","), default=["fp32", "bf16"])
    bench.add_argument("--paper-samples", type=int, default=2, help="samples run by the paper's loop (with reloads: 1)")
    bench.add_argument("--rounds", type=int, default=3, help="alternations of the paper's loop and the engine, summed per row")
    bench.add_argument("--device", default="auto")
    bench.add_argument(
        "--compile",
        type=lambda s: {"true": True, "false": False}.get(s, s),
        default="auto",
        choices=["auto", True, False, "reduce-overhead"],
        help="torch.compile the engine's forwards: auto (on CUDA), true, false, reduce-overhead (CUDA graphs)",
    )
    bench.add_argument("--out", default="outputs/bench.csv", help="CSV file for the table")
    return parser


def main(argv=None) -> int:
    interrupt.install()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # every warning line, whoever logs it
        handler.addFilter(redact_record)
    # MLflow's SQL store logs every failed query with a full traceback before raising; the tracker
    # reports each MLflow failure in one warning line (a full disk must end in one `error:` line).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args.overrides, args.cfg == "job")
        if args.command == "resume":
            return cmd_resume(args.sweep_dir, args.overrides)
        if args.command == "status":
            return cmd_status(args.sweep_dir)
        if args.command == "report":
            return cmd_report(args.sweep_dir)
        if args.command == "decode":
            from .report.decode import decode_command

            return decode_command(args)
        from .bench.run import bench_command

        return bench_command(args)
    except UserError as err:
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 2
    except StoreError as err:
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 3
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        print(f"error: no space left for {err.filename or 'a file'}: free space, then `cram-sweep resume SWEEP_DIR`", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted: finished samples are stored; continue with `cram-sweep resume SWEEP_DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
