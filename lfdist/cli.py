"""The `lfdist` command line: parse, build the config, call one function in lfdist.pipeline.

Bad input ends with one line `lfdist: error: ...` and exit code 2; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

from lfdist.cli_flags import add_config_flags
from lfdist.errors import JobFailed, UserError

_ARGV: list[str] = []  # the command line being parsed (for the did-you-mean hint)
_OVERRIDE = re.compile(r"^(model|data|probe|select|train|out)(\.[A-Za-z_]\w*)*=")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: one line, exit 2
        raise UserError(f"{message}{_did_you_mean(self)}; see `{self.prog} --help`")


def _did_you_mean(parser: argparse.ArgumentParser) -> str:
    """A close flag for the first mistyped one on the command line (`--modle` -> `--model`)."""
    import difflib

    known = sorted(_flags(parser))
    for token in _ARGV:
        flag = token.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            close = difflib.get_close_matches(flag, known, n=1)
            if close:
                return f" ({flag} is not a flag here: did you mean {close[0]}?)"
    return ""


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every --flag of the parser and of the command named on the command line (argparse
    reports an unknown flag from the top-level parser, which knows none of the commands')."""
    flags = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name in _ARGV:
                    flags |= _flags(sub)
    return flags


def _parse(argv: list[str]) -> argparse.Namespace:
    """Dotted overrides may sit anywhere among the flags (as torchrun and HF scripts allow):
    they are taken out, the rest is parsed, and they join the command's `overrides` in order."""
    _ARGV[:] = argv
    overrides = [a for a in argv if _OVERRIDE.match(a)]
    args = build_parser().parse_args([a for a in argv if not _OVERRIDE.match(a)])
    if overrides:
        if not hasattr(args, "overrides"):
            raise UserError(
                f"{args.command} takes no config overrides ({overrides[0]}); "
                f"see `lfdist {args.command} --help`"
            )
        args.overrides = [*args.overrides, *overrides]
    _check_model_data(args)
    return args


def _check_model_data(args: argparse.Namespace) -> None:
    """--model and --data are required unless the --config file or a dotted override names
    them (model.spec, data.spec): `lfdist probe --config run.yaml` needs nothing else."""
    if not hasattr(args, "model") or not hasattr(args, "data"):
        return
    given = _config_specs(args.config) | {
        o.split("=", 1)[0] for o in getattr(args, "overrides", []) if "=" in o
    }
    missing = [
        f"--{name}"
        for name in ("model", "data")
        if getattr(args, name) is None and f"{name}.spec" not in given
    ]
    if missing:
        raise UserError(
            f"the following arguments are required: {', '.join(missing)} (or {missing[0][2:]}.spec "
            f"in --config); see `lfdist {args.command} --help`"
        )


def _config_specs(path: str | None) -> set[str]:
    """Which of model.spec and data.spec a YAML config names (a bad file is load_config's to
    refuse, later, in its own words)."""
    if not path:
        return set()
    try:
        import yaml

        with open(path) as f:
            raw = yaml.safe_load(f)
    except Exception:  # noqa: BLE001 — reported by load_config with the file's name
        return {"model.spec", "data.spec"}
    if not isinstance(raw, dict):
        return {"model.spec", "data.spec"}
    return {
        f"{k}.spec"
        for k in ("model", "data")
        if isinstance(raw.get(k), dict) and raw[k].get("spec")
    }


def _common_model_data(p: argparse.ArgumentParser) -> None:
    # required unless --config or an override names them: checked after parsing
    p.add_argument(
        "--model",
        help="HF id or folder, tiny:<arch>, pkg:smollm2-135m, pkg:minilm-l6",
    )
    p.add_argument(
        "--data",
        help="file/folder, datasets name, pkg:bbc-news, pkg:python-docs, synthetic:lm|classify",
    )
    p.add_argument(
        "--task",
        choices=["lm", "classify"],
        default=None,
        help="default: lm (classify for encoders)",
    )
    p.add_argument("--seq-len", type=int, default=None, help="tokens per example")
    p.add_argument("--config", default=None, help="YAML run config to start from")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lfdist", description="Decide where to fine-tune, then train only there.")
    from lfdist import __version__

    p.add_argument("--version", action="version", version=f"lfdist {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("probe", help="forward-only probe: per-layer statistics -> probe.json")
    _common_model_data(q)
    add_config_flags(q, "probe")
    q.add_argument("--out", required=True)

    s = sub.add_parser(
        "select", help="turn probe statistics into a plan with a strategy and budget"
    )
    s.add_argument("--probe", required=True)
    s.add_argument("--strategy", required=True)
    s.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="blocks=N params=F gib=X flops=F",
    )
    s.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="strategy option, e.g. n=4; the run it prices: engine, zero_stage, world_size, "
        "dtype (default: the probe's), precision (auto: bf16-mixed for bf16), batch_size, "
        "seq_len, and for salf run_steps (the run's train.steps)",
    )
    s.add_argument("--out", required=True)

    pl = sub.add_parser("plan", help="inspect a plan")
    plsub = pl.add_subparsers(dest="plan_command", required=True, parser_class=_Parser)
    show = plsub.add_parser("show", help="print a per-layer table, optionally a PNG")
    show.add_argument("plan")
    show.add_argument("--probe", default=None, help="probe.json to plot the deviation trace from")
    show.add_argument("--png", default=None)
    from lfdist.plan_cost import add_cost_parser

    add_cost_parser(plsub)

    t = sub.add_parser("train", help="fine-tune with a plan on ddp, fsdp1, fsdp2 or deepspeed")
    _common_model_data(t)
    t.add_argument("--plan", required=True)
    add_config_flags(t, "train")
    t.add_argument("--out", required=True)
    t.add_argument("--resume", action="store_true")
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out that holds other files or a finished run (its results go)",
    )
    t.add_argument("--dry-run", action="store_true", help="print the launch command and exit")
    t.add_argument("--nnodes", type=int, default=1)
    t.add_argument("--node-rank", type=int, default=0)
    t.add_argument("--rdzv-endpoint", default=None, help="host:port of node 0 (multi-node)")
    t.add_argument("--hostfile", default=None, help="deepspeed hostfile (multi-node)")

    r = sub.add_parser("run", help="probe -> select -> train as a YAML config says")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*")
    r.add_argument(
        "--compare-full", action="store_true", help="also train all blocks and report savings"
    )
    r.add_argument("--resume", action="store_true")
    r.add_argument(
        "--overwrite", action="store_true", help="start a run in out= over: probe, select, train"
    )
    r.add_argument(
        "--orchestrator",
        choices=["local", "ray"],
        default=None,
        help="ray: probe with Ray actors and train through Ray Train",
    )
    r.add_argument("--ray-address", default=None)

    e = sub.add_parser("export", help="write a standard HF folder from a checkpoint")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--out", required=True)

    ev = sub.add_parser("eval", help="held-out loss, perplexity or accuracy as JSON")
    _common_model_data(ev)

    b = sub.add_parser("bench", help="benchmarks: memory, quality, probe")
    b.add_argument("kind", choices=["memory", "quality", "probe"])
    b.add_argument("--tiny", action="store_true", help="tiny models, minutes on CPU")
    b.add_argument("--out", required=True)
    b.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    b.add_argument(
        "--reuse",
        metavar="DIR",
        help="quality: read the oracle sweep from an earlier --out (re-score without re-training)",
    )
    return p


def _kv(items: list[str], what: str) -> dict:
    from lfdist.config import parse_override

    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"{what} {item!r} must look like key=value")
        path, value = parse_override(item)
        out[".".join(path)] = value
    return out


def _config(args) -> object:
    """--config, then the dotted overrides, then the command's flags (lfdist.cli_flags), then
    --model/--data/--task/--seq-len: one typed config, no dict round trip."""
    from lfdist.cli_flags import given_values
    from lfdist.config import load_config, with_values
    from lfdist.pipeline import with_model_data

    cfg = with_values(load_config(args.config, args.overrides), given_values(args, args.command))
    task = args.task
    if task is None and args.model and _is_encoder(args.model):
        task = "classify"
    return with_model_data(cfg, args.model, args.data, task, args.seq_len)


def _refuse_results(out: str, kind: str, overwrite: bool) -> None:
    """Committed benchmark results live in benchmarks/<kind>/: a trial run must not replace them."""
    from lfdist.pipeline import check_out_folder

    check_out_folder(out)
    held = os.path.join(out, f"{kind}.json")
    if os.path.exists(held) and not overwrite:
        raise UserError(f"{held!r} already exists; choose another --out or pass --overwrite")


def _check_png(path: str) -> None:
    from lfdist.pipeline import _check_parent, _refuse_overwrite

    _refuse_overwrite(path, "--png")
    _check_parent(path)


def _is_encoder(spec: str) -> bool:
    return spec in ("pkg:minilm-l6",) or spec.split(":")[-1] in ("bert", "roberta", "mpnet")


def dispatch(args) -> int:
    from lfdist import pipeline

    if args.command == "probe":
        cfg = _config(args)
        pipeline.probe(cfg, args.out)
        print(f"wrote {args.out}")
    elif args.command == "select":
        plan = pipeline.select(
            args.probe,
            args.strategy,
            _kv(args.budget, "--budget"),
            _kv(args.option, "--option"),
            args.out,
        )
        from lfdist.probe import load_probe
        from lfdist.report import plan_table

        print(plan_table(plan, load_probe(args.probe)))
        print(f"wrote {args.out}")
    elif args.command == "plan" and args.plan_command == "cost":
        from lfdist.plan_cost import run_cli

        print(run_cli(args))
    elif args.command == "plan":
        from lfdist.plan import load_plan
        from lfdist.probe import load_probe
        from lfdist.report import plan_table, plot_plan

        plan = load_plan(args.plan)
        probe = load_probe(args.probe) if args.probe else None
        if args.png:
            _check_png(args.png)
        print(plan_table(plan, probe))
        if args.png:
            plot_plan(plan, args.png, probe)
            print(f"wrote {args.png}")
    elif args.command == "train":
        from lfdist.job import Job
        from lfdist.launch.commands import Nodes

        cfg = _config(args)
        nodes = Nodes(args.nnodes, args.node_rank, args.rdzv_endpoint, args.hostfile)
        job = Job(cfg, args.plan, args.out, resume=args.resume)
        metrics = pipeline.train(job, dry_run=args.dry_run, nodes=nodes, overwrite=args.overwrite)
        if metrics is not None:
            from lfdist.summary import train_summary

            print(train_summary(metrics))
            print(f"wrote {args.out}/metrics.json")
    elif args.command == "run":
        from lfdist.config import load_config
        from lfdist.summary import run_summary

        extra = []
        if args.orchestrator == "ray":
            extra += ["probe.orchestrator=ray", "train.launcher=ray"]
        if args.ray_address:
            extra.append(f"probe.ray_address={args.ray_address}")
        cfg = load_config(args.config, [*args.overrides, *extra])
        result = pipeline.run(
            cfg, compare_full=args.compare_full, resume=args.resume, overwrite=args.overwrite
        )
        print(run_summary(result))
    elif args.command == "export":
        from lfdist.pipeline import check_out_folder
        from lfdist.train.export import export

        check_out_folder(args.out)
        print(f"wrote {export(args.checkpoint, args.out)}")
    elif args.command == "eval":
        print(json.dumps(pipeline.evaluate_model(_config(args)), indent=1))
    elif args.command == "bench":
        from lfdist.bench import run_bench

        if not args.tiny and args.kind == "memory":
            raise UserError("bench memory runs on tiny models only for now; pass --tiny")
        _refuse_results(args.out, args.kind, args.overwrite)
        print(f"wrote {run_bench(args.kind, args.out, tiny=args.tiny, reuse=args.reuse)}")
    return 0


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (tests and callers swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _log_to_stderr() -> None:
    """lfdist's own INFO lines (stage progress, data decisions) on stderr, whatever the terminal."""
    logger = logging.getLogger("lfdist")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("lfdist: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    _log_to_stderr()
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = _parse(argv)
        code = dispatch(args)
    except UserError as e:
        print(f"lfdist: error: {e}", file=sys.stderr)
        code = UserError.exit_code
    except JobFailed as e:  # a rank died or crashed, or a signal stopped the job: one line
        print(f"lfdist: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
