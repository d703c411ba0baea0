"""`smitin registry ...`: register, promote, history, list, show, fetch (thin: parse, call, print)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

KEY_METRICS = ("best_acc", "top16_acc", "mean_acc", "success_rate", "val_loss")


def register(commands: argparse._SubParsersAction) -> None:
    reg = commands.add_parser(
        "registry",
        help="MLflow registry of generators and probe sets: register, promote, history, list, show",
        description="Versions of the generator and of each trait's probe set in MLflow (default sqlite:///mlflow.db "
        "+ ./mlartifacts; MLFLOW_TRACKING_URI or --tracking-uri selects another backend, e.g. an "
        "`mlflow server`). Aliases: challenger (newest registered), champion (promoted, used by "
        "`smitin generate`).",
    )
    reg.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking/registry URI (default: "
        "$MLFLOW_TRACKING_URI, else params registry.tracking_uri, else sqlite:///mlflow.db)",
    )
    reg.add_argument("--params", default="params.yaml", help="params file (section registry)")
    # The same two options after the action too (`smitin registry register --params p.yaml`): SUPPRESS keeps the
    # value given before the action unless it is repeated after it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tracking-uri", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--params", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    actions = reg.add_subparsers(dest="registry_command", required=True, metavar="ACTION")

    p = actions.add_parser(
        "register",
        parents=[common],
        help="log + register new versions (alias challenger); the DVC stage",
        description="Register the generator and/or probe sets named here or in params "
        "registry.register. Content already registered is not registered again.",
    )
    p.add_argument("--generator", default=None, help="generator directory")
    p.add_argument("--probes", action="append", default=[], metavar="[TRAIT=]DIR", help="probe-set directory (repeat)")
    p.add_argument("--coconet", default=None, help="Coconet model directory")
    p.add_argument(
        "--metrics",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="extra metrics JSON for 'generator' or a trait (e.g. steering evaluation), repeatable",
    )
    p.add_argument(
        "--plots",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="plot file/folder for 'generator' or a trait, logged with the run, repeatable",
    )
    p.add_argument("--no-alias", action="store_true", help="do not move the challenger alias")
    p.add_argument("--out", default=None, help="write what was registered as JSON here")
    p.set_defaults(func=_register)

    p = actions.add_parser(
        "promote",
        parents=[common],
        help="move alias champion to a version if the gates pass",
        description="Gates: ready, metrics not worse than the champion beyond the tolerance "
        "(params registry.gates), probe set trained on the champion generator.",
    )
    p.add_argument("model", help="registered model name, 'generator', or a trait (drums)")
    p.add_argument("--version", default=None, help="version to promote (default: challenger, else newest)")
    p.add_argument("--force", action="store_true", help="promote even if gates fail (recorded in the history)")
    p.add_argument("--reason", default="", help="why (recorded in the history)")
    p.add_argument("--dry-run", action="store_true", help="only evaluate the gates")
    p.set_defaults(func=_promote)

    p = actions.add_parser(
        "history", parents=[common], help="who moved which alias when, from which version to which, and why"
    )
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.set_defaults(func=_history)

    p = actions.add_parser(
        "list", parents=[common], help="registered models with their champion / challenger and key metrics"
    )
    p.add_argument("model", nargs="?", help="list this model's versions instead (same as show)")
    p.set_defaults(func=_list)

    p = actions.add_parser(
        "show", parents=[common], help="a model's versions (aliases, key metrics, lineage) or one version in full"
    )
    p.add_argument("model")
    p.add_argument("--version", default=None)
    p.add_argument("--alias", default=None)
    p.set_defaults(func=_show)

    p = actions.add_parser(
        "fetch", parents=[common], help="resolve a models:/ URI and download it into the local cache"
    )
    p.add_argument("uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.set_defaults(func=_fetch)

    r = commands.add_parser(
        "refresh",
        help="the scheduled job: dvc repro, then promote new challengers through the gates",
        description="Run `dvc repro` in the project (only stages whose inputs changed run: no new audio, no "
        "training), then offer the generator's and each trait's challenger for promotion to champion "
        "through the gates of params registry.gates. A refused promotion keeps the current champion "
        "and is recorded in `smitin registry history`.",
        epilog="cron example: 0 3 * * * cd /srv/smitin && .venv/bin/smitin refresh >> refresh.log 2>&1",
    )
    r.add_argument("--project", default=".", help="the project folder (dvc.yaml, params.yaml); default: here")
    r.add_argument("--no-promote", action="store_true", help="only dvc repro (new versions stay challengers)")
    r.add_argument("--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI, else params)")
    r.add_argument(
        "--dvc-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="passed to dvc repro, e.g. --dvc-arg=--pull (repeatable)",
    )
    r.set_defaults(func=_refresh)


def _registry(args):
    from registry.store import Registry, Settings

    return Registry(Settings.load(args.params, tracking_uri=args.tracking_uri))


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _pairs(items: list[str], what: str) -> dict[str, str]:
    from registry.errors import RegistryError

    out = {}
    for item in items:
        if "=" not in item:
            raise RegistryError(f"{what} {item!r}: expected NAME=PATH")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def _register(args) -> int:
    from registry.errors import RegistryError
    from registry.registration import read_metrics, register_many, stage_inputs, stage_traits

    reg = _registry(args)
    if args.generator or args.probes or args.coconet:
        generator, probes, coconet = args.generator, {}, args.coconet
        for item in args.probes:
            trait, _, directory = item.rpartition("=")
            if not trait:
                from registry.artifacts import inspect_dir

                trait = inspect_dir(directory, "probe_set").trait
            probes[trait] = directory
        metrics = {k: read_metrics(v) for k, v in _pairs(args.metrics, "--metrics").items()}
        plots = {k: [v] for k, v in _pairs(args.plots, "--plots").items()}
    else:  # the DVC stage: everything from params.yaml
        spec = reg.settings.register
        todo = stage_inputs(spec, stage_traits(spec, args.params))
        generator, probes, metrics, plots = todo["generator"], todo["probes"], todo["metrics"], todo["plots"]
        coconet = todo["coconet"]
    if not generator and not probes and not coconet:
        raise RegistryError(
            "nothing to register: give --generator/--probes/--coconet or set registry.register in params"
        )
    done = register_many(
        reg,
        generator,
        probes,
        metrics=metrics,
        plots=plots,
        alias=None if args.no_alias else "challenger",
        coconet_dir=coconet,
    )
    for r in done:
        for version in r.cleaned:
            print(f"{r.name}: removed v{version}, left half-registered by an interrupted registration")
        state = "registered" if r.created else "already registered"
        print(
            f"{r.name}: {state} as version {r.version}"
            + (" (alias challenger)" if r.created and not args.no_alias else "")
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(
                {r.name: {"version": int(r.version), "new": r.created, "content_hash": r.content_hash} for r in done},
                indent=2,
                sort_keys=True,
            )
            + "\n"
        )
    return 0


def _promote(args) -> int:
    from registry.promotion import promote, stale_probe_sets

    reg = _registry(args)
    result = promote(reg, args.model, args.version, force=args.force, reason=args.reason, dry_run=args.dry_run)
    for version in result.cleaned:
        print(f"{result.name}: removed v{version}, left half-registered by an interrupted registration")
    for g in result.gates:
        print(f"  {g}")
    if args.dry_run:
        print(f"{result.name} v{result.version}: " + ("would be promoted" if not result.failed else "would be refused"))
        return 0 if not result.failed else 1
    if not result.promoted:
        print(f"{result.name}: v{result.version} is already the champion; nothing to do")
        return 0
    prev = f"v{result.previous}" if result.previous else "none"
    print(f"{result.name}: champion {prev} -> v{result.version}" + (" (FORCED; recorded)" if result.forced else ""))
    if result.name == reg.settings.generator_name:
        fp = reg.client.get_model_version(result.name, result.version).tags.get("smitin.fingerprint", "")
        stale = stale_probe_sets(reg, fp)
        if stale:
            print(
                f"note: these probe-set champions were trained on another generator and will be refused by "
                f"`smitin generate` until probe sets for v{result.version} are promoted: {', '.join(stale)}"
            )
    return 0


def _history(args) -> int:
    from registry.promotion import history

    name, events = history(_registry(args), args.model)
    if args.json:
        for e in events:
            print(json.dumps(e, sort_keys=True))
        return 0
    if not events:
        print(f"{name}: no history yet")
        return 0
    rows = [
        {
            "when": e.get("when", ""),
            "who": e.get("who", ""),
            "action": e.get("action", ""),
            "alias": e.get("alias", ""),
            "from": f"v{e['from']}" if e.get("from") else "-",
            "to": f"v{e['to']}" if e.get("to") else "-",
            "why": "; ".join(
                x
                for x in [e.get("why", "")]
                + ([f"overrode {', '.join(e['overridden'])}"] if e.get("overridden") else [])
                + ([g for g in e.get("gates", []) if "FAILED" in g] if e.get("action") == "refused" else [])
                if x
            ),
        }
        for e in events
    ]
    print(f"{name}: alias history")
    print(table(rows, ["when", "who", "action", "alias", "from", "to", "why"]))
    return 0


def _key_metrics(metrics: dict) -> str:
    return " ".join(f"{k}={metrics[k]:.3f}" for k in KEY_METRICS if k in metrics)


def _list(args) -> int:
    if args.model:
        args.version = args.alias = None
        return _show(args)
    from registry.promotion import alias_version, version_metrics
    from registry.store import translate_errors

    reg = _registry(args)
    reg.check()
    rows = []
    with translate_errors(reg):
        c = reg.client
        for rm in sorted(reg.registered_models(), key=lambda m: m.name):
            versions = c.search_model_versions(f"name = '{rm.name}'")
            aliases = rm.aliases or {}
            champ = alias_version(c, rm.name, "champion") if "champion" in aliases else None
            rows.append(
                {
                    "model": rm.name,
                    "versions": len(versions),
                    "latest": f"v{max(int(v.version) for v in versions)}" if versions else "-",
                    "champion": f"v{aliases['champion']}" if "champion" in aliases else "-",
                    "challenger": f"v{aliases['challenger']}" if "challenger" in aliases else "-",
                    "champion metrics": _key_metrics(version_metrics(champ)) if champ else "",
                }
            )
    if not rows:
        print(f"nothing registered in {reg.uri}")
        return 0
    print(f"registry: {reg.uri}")
    print(table(rows, ["model", "versions", "latest", "champion", "challenger", "champion metrics"]))
    return 0


def _show(args) -> int:
    from registry.promotion import version_metrics
    from registry.store import PENDING, TAG, translate_errors

    reg = _registry(args)
    reg.check()
    with translate_errors(reg):
        c = reg.client
        name = reg.resolve_name(args.model)
        from registry.errors import ModelNotFound

        if not c.search_registered_models(f"name = '{name}'"):
            raise ModelNotFound(f"no registered model named {name!r}; see `smitin registry list`")
        if args.version or args.alias:
            from registry.loading import resolve

            mv = resolve(reg, f"models:/{name}@{args.alias}" if args.alias else f"models:/{name}/{args.version}")
            print(f"{name} v{mv.version}  aliases: {', '.join(mv.aliases) or '-'}  status: {mv.status}")
            print(
                f"  created: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(mv.creation_timestamp / 1000))}  "
                f"run: {mv.run_id}" + (f"  logged model: {mv.model_id}" if mv.model_id else "")
            )
            print(f"  source: {mv.source}")
            if mv.description:
                print(f"  description: {mv.description}")
            print("  metrics:")
            for k, v in sorted(version_metrics(mv).items()):
                print(f"    {k} = {v:.6g}")
            print("  lineage and identity:")
            for k, v in sorted(mv.tags.items()):
                if k.startswith(TAG) and k != TAG + "metrics":
                    print(f"    {k.removeprefix(TAG)} = {v}")
            return 0
        versions = sorted(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
        by_version: dict[str, list[str]] = {}
        for alias, v in (c.get_registered_model(name).aliases or {}).items():
            by_version.setdefault(str(v), []).append(alias)
        rows = []
        for mv in versions:
            t = mv.tags
            gen_version = t.get(TAG + "generator_version", "?")
            # a probe set made on external weights (MusicGen) names a generator that is referenced, not registered
            gen_version = gen_version if gen_version == "unregistered" else f"v{gen_version}"
            ident = (
                t.get(TAG + "fingerprint", "")[:12]
                or f"gen {t.get(TAG + 'generator_fingerprint', '')[:12]} ({gen_version})"
            )
            rows.append(
                {
                    "version": mv.version,
                    "aliases": ",".join(sorted(by_version.get(str(mv.version), []))) or "-",
                    "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(mv.creation_timestamp / 1000)),
                    "metrics": _key_metrics(version_metrics(mv)),
                    "generator": ident,
                    "git": t.get(TAG + "git_commit", "")[:10],
                    # left by an interrupted registration: never served, removed by the next register / promote
                    "status": "PENDING" if PENDING in t else mv.status,
                }
            )
    print(f"{name}: {len(rows)} version(s)")
    print(table(rows, ["version", "aliases", "created", "metrics", "generator", "git", "status"]))
    return 0


def _fetch(args) -> int:
    from registry.loading import fetch

    t0 = time.perf_counter()
    m = fetch(_registry(args), args.uri)
    print(
        f"{m.label()} ({m.kind}) -> {m.path}  [{'cache hit' if m.cached else 'downloaded'}, "
        f"{time.perf_counter() - t0:.2f} s]"
    )
    return 0


def _refresh(args) -> int:
    import os

    from registry.refresh import refresh

    os.chdir(args.project)  # the stages and the default sqlite:///mlflow.db are relative to the project
    result = refresh(Path("."), dvc_args=args.dvc_arg, promote=not args.no_promote, tracking_uri=args.tracking_uri)
    if result.promoted:
        print("promoted: " + ", ".join(f"{m} v{v}" for m, v in result.promoted.items()))
    return 0
