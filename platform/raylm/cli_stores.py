"""`raylm datasets | models | feedback`: what the jobs stored, read and managed from the command
line (dataset versions, the model registry and its aliases, the ratings users sent). The cluster
and job commands, and the entry point, are in cli.py."""

from __future__ import annotations

import argparse
import json
import sys

from raylm import cluster
from raylm.cli import _print_err


# --- datasets ----------------------------------------------------------------------------------

def cmd_datasets_list(a: argparse.Namespace) -> int:
    from raylm.data.versions import list_versions

    versions = list_versions(a.root)
    if a.json:
        print(json.dumps([{k: m[k] for k in ("id", "uri", "created", "counts", "splits")} for m in versions],
                         indent=2))
        return 0
    if not versions:
        from raylm.data.pipeline import default_root

        print(f"no dataset versions under {a.root or default_root()}")
        return 0
    print(f"{'DATASET':<30} {'DOCS':>6} {'TOKENS':>11} {'QUAR.':>6}  {'CREATED':<20} SOURCES")
    for m in versions:
        srcs = ",".join(s.get("kind", "?") for s in m.get("sources", []))
        srcs += " (chat)" if m.get("format") == "chat" else ""
        print(f"{m['id']:<30} {m['counts']['documents']:>6} {m['counts']['tokens']:>11} "
              f"{m['counts']['quarantined']:>6}  {m['created'][:19]:<20} {srcs}")
        print(f"{'':<30} {m['uri']}")
    return 0


def cmd_datasets_show(a: argparse.Namespace) -> int:
    from raylm.data.versions import resolve

    try:
        m = resolve(a.ref, a.root)
    except FileNotFoundError as e:
        _print_err(str(e))
        return 1
    if a.json:
        print(json.dumps(m, indent=2))
        return 0
    from raylm import storage
    from raylm.data.job import summary, steps_table

    print(summary(m))
    print(steps_table(m))
    report = (m.get("files") or {}).get("report")
    if report:
        uri = storage.join(m["uri"], report)
        print(f"report:          {uri}" + (f"\n                 (open file://{uri})" if storage.is_local(uri) else ""))
    print("full manifest:   raylm datasets show --json " + m["id"])
    return 0


def _delete(a: argparse.Namespace, version_hint: str, delete, shown) -> int:
    """`raylm datasets|models delete`: the reference must name a version (`version_hint`)."""
    if "@" not in a.ref:
        _print_err(f"name the version to delete: {a.ref}@{version_hint} (the list command shows them)")
        return 2
    try:
        print(f"deleted {shown(delete())}")
    except (FileNotFoundError, ValueError) as e:
        _print_err(str(e))
        return 1
    return 0


def _prune(a: argparse.Namespace, prune, kept: str) -> int:
    """`raylm datasets|models prune`: what was (or, with --dry-run, would be) deleted."""
    try:
        ids = prune()
    except (FileNotFoundError, ValueError) as e:
        _print_err(str(e))
        return 1
    print(f"{'would delete' if a.dry_run else 'deleted'} {len(ids)} version(s) of {a.name}"
          + (": " + ", ".join(ids) if ids else "") + f" (kept the newest {a.keep} and {kept})")
    return 0


def cmd_datasets_delete(a: argparse.Namespace) -> int:
    from raylm.data import versions

    return _delete(a, "VERSION", lambda: versions.delete(a.ref, a.root, a.registry, force=a.force),
                   lambda m: f"{m['id']} ({m['uri']})")


def cmd_datasets_prune(a: argparse.Namespace) -> int:
    from raylm.data import versions

    return _prune(a, lambda: versions.prune(a.name, a.keep, a.root, a.registry, dry_run=a.dry_run),
                  "every one a registered model was trained on")


# --- models ----------------------------------------------------------------------------------

def cmd_models_list(a: argparse.Namespace) -> int:
    from raylm import registry

    cards = registry.list_models(a.registry)
    if not cards:
        print(f"no models in {a.registry or registry.default_root()}")
        return 0
    held: dict[str, list[str]] = {}  # id -> its aliases
    for name in sorted({c["name"] for c in cards}):
        for alias, version in registry.aliases(name, a.registry).items():
            held.setdefault(f"{name}@v{version}", []).append(alias)
    print(f"{'MODEL':<28} {'TASK':<14} {'STRATEGY':<16} {'DATASET':<28} {'VAL_LOSS':>9} {'VAL_ACC':>8}  "
          f"{'CREATED':<19}  ALIASES")
    for c in cards:
        m = c.get("metrics", {})
        vl, acc = m.get("val_loss"), m.get("val_accuracy")
        print(f"{c['id']:<28} {c['task']:<14} {c.get('strategy', ''):<16} {c.get('dataset', '')[:28]:<28} "
              f"{(f'{vl:.4f}' if vl is not None else '-'):>9} {(f'{acc:.3f}' if acc is not None else '-'):>8}  "
              f"{c['created'][:19]:<19}  {','.join(sorted(held.get(c['id'], []))) or '-'}")
    return 0


def cmd_models_show(a: argparse.Namespace) -> int:
    from raylm import registry

    try:
        card = registry.resolve(a.ref, a.registry)
    except FileNotFoundError as e:
        _print_err(str(e))
        return 1
    if "name" in card and "version" in card:  # the aliases that point here (kept beside the card, not in it)
        card = {**card, "aliases": sorted(k for k, v in registry.aliases(card["name"], a.registry).items()
                                          if v == card["version"])}
    print(json.dumps(card, indent=2))
    return 0


def cmd_models_alias(a: argparse.Namespace) -> int:
    from raylm import registry

    try:
        if a.remove:
            name = a.ref.partition("@")[0]
            if not registry.remove_alias(name, a.alias, a.registry):
                _print_err(f"model {name!r} has no alias {a.alias!r}")
                return 1
            print(f"removed {name}@{a.alias}")
            return 0
        if "@" not in a.ref:
            _print_err(f"name the version the alias should point at: {a.ref}@vN (or {a.ref}@latest)")
            return 2
        before = registry.alias_of(a.ref.partition("@")[0], a.alias, a.registry)
        rec = registry.set_alias(a.ref, a.alias, a.registry, reason=a.reason or "set by hand (raylm models alias)")
    except (FileNotFoundError, ValueError) as e:
        _print_err(str(e))
        return 1
    was = f" (was v{before['version']})" if before and before["version"] != rec["version"] else ""
    print(f"{rec['name']}@{rec['alias']} -> {rec['id']}{was}")
    return 0


class _Unchecked(ValueError):
    """What the cluster serves could not be told: delete / prune must not go on."""


def _served() -> dict[str, list[str]]:
    """What the cluster's Serve apps serve (model URI -> where); {} with a note when no cluster."""
    from raylm.serve.job import ServedUnknown, served_versions

    try:
        found = served_versions()
    except ServedUnknown as e:
        raise _Unchecked(f"{e}: not deleting anything it might serve (retry when it answers, or --force "
                         "for one version)") from None
    if found is None:
        print("note: no cluster to ask (no `raylm up` here, no RAY_ADDRESS): not checked whether Serve serves it",
              file=sys.stderr)
    return found or {}


def cmd_models_delete(a: argparse.Namespace) -> int:
    from raylm import registry

    return _delete(a, "vN", lambda: registry.delete(a.ref, a.registry, force=a.force, reason="raylm models delete",
                                                    served=None if a.force else _served()),
                   lambda card: f"{card['id']} (its number stays taken)")


def cmd_models_prune(a: argparse.Namespace) -> int:
    from raylm import registry

    return _prune(a, lambda: registry.prune(a.name, a.keep, a.registry, dry_run=a.dry_run, served=_served()),
                  "every aliased or served one")


def cmd_feedback_stats(a: argparse.Namespace) -> int:
    from raylm import storage
    from raylm.serve.feedback import stats

    uri = storage.normalize(a.uri or str(cluster.home() / "feedback" / a.app))
    try:
        s = stats(uri)
    except storage.StorageError as e:
        _print_err(f"{e} (the app's feedback_uri; default $RAYLM_HOME/feedback/<app name>)")
        return 1
    if a.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{s['records']} ratings in {s['files']} file(s) under {uri}"
          + (f"; {s['skipped']} line(s) skipped (not feedback records)" if s["skipped"] else ""))
    if s["versions"]:
        print(f"{'MODEL':<20} {'VERSION':<28} {'N':>6} {'GOOD':>6} {'NEUTRAL':>7} {'BAD':>6}  GOOD SHARE (95%)")
    for v in s["versions"]:
        lo, hi = v["good_share_95"]
        print(f"{v['model']:<20} {v['version']:<28} {v['n']:>6} {v['good']:>6} {v['neutral']:>7} {v['bad']:>6}  "
              f"{v['good_share']:.3f} ({lo:.3f}-{hi:.3f})")
    return 0


def cmd_feedback_pairs(a: argparse.Namespace) -> int:
    from raylm import storage
    from raylm.serve.feedback import pairs

    uri = storage.normalize(a.uri or str(cluster.home() / "feedback" / a.app))
    try:
        p = pairs(uri, a.max_per_prompt, a.version)
    except storage.StorageError as e:
        _print_err(f"{e} (the app's feedback_uri; default $RAYLM_HOME/feedback/<app name>)")
        return 1
    except ValueError as e:
        _print_err(f"--max-per-prompt: {e}")
        return 2
    out = storage.normalize(a.out)
    storage.write_text(out, "".join(json.dumps(x) + "\n" for x in p["pairs"]))
    print(f"{len(p['pairs'])} preference pairs from {p['records']} rated chat answers to {p['conversations']} "
          f"conversations under {uri} -> {out}"
          + (f"; {p['unpaired']} rated answers had no opposite rating to pair with" if p["unpaired"] else "")
          + (f"; {p['skipped']} records skipped (not rated chat answers)" if p["skipped"] else "")
          + (f"; {p['other_versions']} records of versions other than {a.version} left out" if p["other_versions"] else ""))
    if p["pairs"]:
        print(f"read them with a data source: {{kind: jsonl, uri: {out}, format: preference, id_field: id}}")
    else:
        print("no pairs yet: a pair needs two different answers to one conversation (the chat routes), one rated "
              "good (1) and one rated bad (-1)")
    return 0


def cmd_feedback_ratings(a: argparse.Namespace) -> int:
    from raylm import storage
    from raylm.serve.feedback import ratings

    uri = storage.normalize(a.uri or str(cluster.home() / "feedback" / a.app))
    try:
        r = ratings(uri, a.version)
    except storage.StorageError as e:
        _print_err(f"{e} (the app's feedback_uri; default $RAYLM_HOME/feedback/<app name>)")
        return 1
    out = storage.normalize(a.out)
    storage.write_text(out, "".join(json.dumps(x) + "\n" for x in r["ratings"]))
    print(f"{len(r['ratings'])} rated chat answers ({r['good']} good, {r['bad']} bad) under {uri} -> {out}"
          + (f"; {r['neutral']} neutral ratings left out" if r["neutral"] else "")
          + (f"; {r['duplicates']} repeated ratings of one answer kept once" if r["duplicates"] else "")
          + (f"; {r['skipped']} records skipped (not rated chat answers)" if r["skipped"] else "")
          + (f"; {r['other_versions']} records of versions other than {a.version} left out" if r["other_versions"] else ""))
    if r["ratings"]:
        print(f"read them with a data source: {{kind: jsonl, uri: {out}, format: rated, id_field: id}}; train with "
              "preference.loss: kto")
        if r["good"] and r["bad"]:
            ratio = r["good"] / r["bad"]
            if not 1 <= ratio <= 4 / 3:
                print(f"KTO's authors keep desirable_weight x good / (undesirable_weight x bad) within 1 to 4/3: "
                      f"here {r['good']} good and {r['bad']} bad, so e.g. preference.desirable_weight="
                      f"{r['bad'] / r['good']:.3g} (before the split)")
    else:
        print("no rated chat answers yet: ratings of 1 or -1 on answers of the chat routes")
    return 0


def add_parsers(sub) -> None:
    """The `datasets`, `models` and `feedback` subcommands, on the top-level parser's `sub`."""
    ds = sub.add_parser("datasets", help="dataset versions").add_subparsers(dest="datasets_command", required=True)
    s = ds.add_parser("list", help="versions with counts, tokens, sources, created")
    s.add_argument("--root", help="dataset root URI (default $RAYLM_HOME/datasets)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_datasets_list)
    s = ds.add_parser("show", help="one version: counts per step, splits, link to its data report")
    s.add_argument("ref", help="NAME, NAME@VERSION or a version URI")
    s.add_argument("--root")
    s.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    s.set_defaults(fn=cmd_datasets_show)
    s = ds.add_parser("delete", help="delete one version (refused for one a registered model was trained on)")
    s.add_argument("ref", help="NAME@VERSION")
    s.add_argument("--root")
    s.add_argument("--registry", help="the registry whose models are checked (default $RAYLM_HOME/registry)")
    s.add_argument("--force", action="store_true", help="also when a registered model was trained on it")
    s.set_defaults(fn=cmd_datasets_delete)
    s = ds.add_parser("prune", help="delete all versions of a dataset but the newest N and those models use")
    s.add_argument("name")
    s.add_argument("--keep", type=int, required=True, help="newest versions to keep (at least 1)")
    s.add_argument("--root")
    s.add_argument("--registry", help="the registry whose models are checked (default $RAYLM_HOME/registry)")
    s.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    s.set_defaults(fn=cmd_datasets_prune)

    ms = sub.add_parser("models", help="the model registry").add_subparsers(dest="models_command", required=True)
    s = ms.add_parser("list", help="registered models with task, strategy, dataset, metrics")
    s.add_argument("--registry", help="registry root URI (default $RAYLM_HOME/registry)")
    s.set_defaults(fn=cmd_models_list)
    s = ms.add_parser("show", help="one model's card")
    s.add_argument("ref", help="NAME, NAME@vN, NAME@ALIAS or a model directory URI")
    s.add_argument("--registry")
    s.set_defaults(fn=cmd_models_show)
    s = ms.add_parser("alias", help="point an alias (NAME@ALIAS, e.g. production) at a version, or remove it")
    s.add_argument("ref", help="NAME@vN (or NAME@latest, NAME@OTHER_ALIAS) to point the alias at; NAME with --remove")
    s.add_argument("alias", help="the alias: a letter, then letters, digits, '-' or '_'")
    s.add_argument("--remove", action="store_true", help="delete the alias")
    s.add_argument("--reason", help="kept in the alias's history")
    s.add_argument("--registry")
    s.set_defaults(fn=cmd_models_alias)
    s = ms.add_parser("delete", help="delete one version's files (refused for a version an alias points at)")
    s.add_argument("ref", help="NAME@vN (or NAME@ALIAS with --force)")
    s.add_argument("--force", action="store_true", help="also when an alias points at it (the alias is removed)")
    s.add_argument("--registry")
    s.set_defaults(fn=cmd_models_delete)
    s = ms.add_parser("prune", help="delete all versions of a model but the newest N and the aliased ones")
    s.add_argument("name")
    s.add_argument("--keep", type=int, required=True, help="newest versions to keep (at least 1)")
    s.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    s.add_argument("--registry")
    s.set_defaults(fn=cmd_models_prune)

    fs = sub.add_parser("feedback", help="what users rated, by model and registry version").add_subparsers(
        dest="feedback_command", required=True)
    s = fs.add_parser("stats", help="ratings per model and version (a canary beside its model), with the share "
                                    "of good ones and its 95%% interval")
    s.add_argument("--app", default="raylm", help="the deploy config's name (default raylm)")
    s.add_argument("--uri", help="the app's feedback_uri (default $RAYLM_HOME/feedback/<app>)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_feedback_stats)
    s = fs.add_parser("pairs", help="preference pairs (an answer rated good, one rated bad, to the same "
                                    "conversation) as JSONL for a format: preference data source (DPO)")
    s.add_argument("--app", default="raylm", help="the deploy config's name (default raylm)")
    s.add_argument("--uri", help="the app's feedback_uri (default $RAYLM_HOME/feedback/<app>)")
    s.add_argument("--out", required=True, help="the JSONL file to write (a path or s3:// URI)")
    s.add_argument("--max-per-prompt", type=int, default=4, help="pairs per conversation at most (default 4)")
    s.add_argument("--version", help="only the answers this registry version gave (NAME@vN, as /v1/feedback records it)")
    s.set_defaults(fn=cmd_feedback_pairs)
    s = fs.add_parser("ratings", help="every chat answer rated good or bad, one record each (unpaired: KTO, "
                                      "preference.loss kto) as JSONL for a format: rated data source")
    s.add_argument("--app", default="raylm", help="the deploy config's name (default raylm)")
    s.add_argument("--uri", help="the app's feedback_uri (default $RAYLM_HOME/feedback/<app>)")
    s.add_argument("--out", required=True, help="the JSONL file to write (a path or s3:// URI)")
    s.add_argument("--version", help="only the answers this registry version gave (NAME@vN, as /v1/feedback records it)")
    s.set_defaults(fn=cmd_feedback_ratings)
