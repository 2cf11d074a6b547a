"""The `shardwise` command: status of the shard stores, config checks."""

from __future__ import annotations

import argparse
import shlex
import sys

from shardwise import __version__
from shardwise.errors import ShardwiseError


def _status(args: argparse.Namespace) -> int:
    import json

    from shardwise.config import load_config_file
    from shardwise.status import render_report, report

    rep = report(args.results, load_config_file(args.config) if args.config else None)
    if args.json:
        sys.stdout.write(json.dumps(rep.as_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(render_report(rep, tail=args.tail))
    return rep.exit_code


def _verify(args: argparse.Namespace) -> int:
    from shardwise.status import verify_stores

    lines, n_bad = verify_stores(args.results)
    sys.stdout.write("".join(line + "\n" for line in lines) or f"no shard stores under {args.results}\n")
    if n_bad:
        print(
            f"shardwise: {n_bad} shard(s) do not hold their recorded data; run the workflow again: "
            "the merge takes them out of the store and the next run recomputes them",
            file=sys.stderr,
        )
    return 1 if n_bad else 0


def _check(args: argparse.Namespace) -> int:
    from shardwise.checks import check_inputs
    from shardwise.config import load_config_file

    cfg = load_config_file(args.config)
    counts = check_inputs(cfg)
    items = "".join(f", {n} {name}" for name, n in counts.items())
    stages = f"{len(cfg.generate.runs)} generation run(s)"
    if cfg.teacher_logits.teachers:
        stages += f", {len(cfg.teacher_logits.teachers)} teacher(s)"
    if cfg.probes.models:
        stages += f", probes of {len(cfg.probes.models)} model(s)"
    if args.profile:
        from shardwise.cluster import check_profile

        problems = check_profile(cfg, args.profile)
        for line in problems:
            print(f"shardwise: error: {line}", file=sys.stderr)
        if problems:
            return 1
        stages += f"; every job fits {args.profile}'s partitions"
    print(f"{args.config}: ok ({len(cfg.models)} model(s), {stages}{items})")
    return 0


def _install_profile(args: argparse.Namespace) -> int:
    from shardwise.profile import install_profile

    link, created = install_profile(args.name)
    state = "installed" if created else "already installed"
    print(f"{state}: {link} -> {link.resolve()}; run `snakemake --profile {shlex.quote(args.name)}`")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardwise", description=__doc__)
    parser.add_argument("--version", action="version", version=f"shardwise {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "status",
        help="shards done/running/failed/pending per stage and model; exit 2 if a shard failed, "
        "1 on an error (e.g. a results path with no shardwise run)",
    )
    p.add_argument("--results", default="results", help="results directory (default: results)")
    p.add_argument("--tail", type=int, default=8, help="log lines shown per failed shard")
    p.add_argument("--config", help="the run's config: its stages not started yet are listed as pending")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(fn=_status)
    p = sub.add_parser("verify", help="read every shard and check its size and sha256 (changes nothing)")
    p.add_argument("--results", default="results", help="results directory (default: results)")
    p.set_defaults(fn=_verify)
    p = sub.add_parser("check", help="validate a config file and its inputs without running")
    p.add_argument("config", nargs="?", default="config/config.yaml")
    p.add_argument(
        "--profile",
        help="also check every job's request against this SLURM profile's partition table "
        "(e.g. profiles/slurm) and its account",
    )
    p.set_defaults(fn=_check)
    p = sub.add_parser(
        "install-profile", help="link profiles/slurm where `snakemake --profile slurm` finds it"
    )
    p.add_argument("name", nargs="?", default="slurm", help="profile under profiles/ (default: slurm)")
    p.set_defaults(fn=_install_profile)
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except ShardwiseError as exc:
        print(f"shardwise: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
