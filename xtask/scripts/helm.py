#!/usr/bin/env python3
"""helm: a thin command line over Helm's own Go SDK (helm-python-sdk).

Where no `helm` binary is installed, this gives the commands supermesh's docs and
tests use, with helm's syntax and output: lint, template, install, upgrade,
uninstall, status, list and version. Charts are linted, rendered and released by
Helm itself (the SDK bundles Helm v4 as a library); this file only parses flags
and prints results.

Values compose as helm composes them: `-f` files in order, then `--set-json`,
`--set`, `--set-string`, `--set-file` and `--set-literal`, each flag in order,
maps merged key by key and anything else replaced. (helm applies an index such
as `--set list[1]=x` to a list given earlier; here that list is replaced.)
"""

import argparse
import logging
import math
import re
import sys
from datetime import datetime

try:
    import helm_python as helm
except Exception as e:  # a missing package or a native library that does not load
    sys.exit(f"Error: cannot load Helm's SDK ({e}); install it with `pip install helm-python-sdk==0.2.2`")

# Helm's default for --timeout.
DEFAULT_TIMEOUT = "5m"
SEVERITIES = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


class UserError(Exception):
    """A failure worth one line to the user, like HelmError."""


def main(argv):
    cli = parser()
    args = cli.parse_args(argv)
    if not hasattr(args, "run"):
        cli.print_help()
        return 1
    if getattr(args, "debug", False):
        logging.basicConfig(level=logging.DEBUG, format="%(message)s")
        helm.enable_logging(logging.DEBUG)
    try:
        return args.run(args) or 0
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"Error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except (helm.HelmError, UserError) as e:
        print(f"Error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def parser():
    # Global flags are accepted before and after the subcommand, as helm's are; SUPPRESS
    # keeps a flag given in one place from being reset by the other's default.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("-n", "--namespace", help="namespace scope for this request")
    common.add_argument("--kubeconfig", help="path to the kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    common.add_argument("--kube-context", help="name of the kubeconfig context to use")
    common.add_argument("--debug", action="store_true", help="log what Helm does to stderr")

    values = argparse.ArgumentParser(add_help=False)
    values.add_argument("-f", "--values", action="append", default=[], metavar="FILE",
                        help="values in a YAML file, or - for standard input (repeatable)")
    for flag, what in [
        ("--set-json", "JSON values"),
        ("--set", "values"),
        ("--set-string", "STRING values"),
        ("--set-file", "values read from files"),
        ("--set-literal", "a literal STRING value"),
    ]:
        values.add_argument(flag, action="append", default=[], metavar="KEY=VAL",
                            help=f"set {what} on the command line (repeatable; key1=val1,key2=val2)")

    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--wait", action="store_const", const="watcher", default=None,
                         help="wait until the release's resources are ready (or gone), up to --timeout")
    waiting.add_argument("--timeout", type=seconds, default=seconds(DEFAULT_TIMEOUT),
                         help=f"time to wait for any Kubernetes operation (default {DEFAULT_TIMEOUT})")

    release = argparse.ArgumentParser(add_help=False, parents=[waiting])
    release.add_argument("--create-namespace", action="store_true", help="create the release namespace if not present")
    release.add_argument("--rollback-on-failure", "--atomic", action="store_true",
                         help="on failure, remove the installation or roll the upgrade back")

    top = argparse.ArgumentParser(prog="helm", parents=[common],
                                  description="Helm, the Kubernetes package manager (through helm-python-sdk)")
    commands = top.add_subparsers(title="commands", metavar="COMMAND")

    def command(name, run, about, parents=()):
        sub = commands.add_parser(name, help=about, description=about, parents=[common, *parents])
        sub.set_defaults(run=run)
        return sub

    sub = command("lint", lint, "examine charts for possible issues", [values])
    sub.add_argument("charts", nargs="*", default=["."], metavar="CHART")
    sub.add_argument("--strict", action="store_true", help="fail on lint warnings")
    sub.add_argument("--kube-version", help="Kubernetes version to lint against, for example 1.20.0")

    sub = command("template", template, "locally render templates", [values])
    sub.add_argument("names", nargs="+", metavar="[NAME] CHART")

    sub = command("install", install, "install a chart", [values, release])
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("chart", metavar="CHART")

    sub = command("upgrade", upgrade, "upgrade a release", [values, release])
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("chart", metavar="CHART")
    sub.add_argument("-i", "--install", action="store_true", help="install the release if it does not exist")
    sub.add_argument("--reuse-values", action="store_true", help="start from the last release's values")
    sub.add_argument("--reset-values", action="store_true", help="start from the chart's values")

    sub = command("uninstall", uninstall, "uninstall a release", [waiting])
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("--keep-history", action="store_true", help="keep the release history")
    sub.add_argument("--ignore-not-found", action="store_true", help="succeed when the release does not exist")

    sub = command("status", status, "display the status of the named release")
    sub.add_argument("name", metavar="NAME")

    sub = command("list", list_releases, "list releases")
    sub.add_argument("-A", "--all-namespaces", action="store_true", help="list releases across all namespaces")
    sub.add_argument("-a", "--all", action="store_true", help="list releases in every state")

    sub = command("version", version, "print the Helm version")
    sub.add_argument("--short", action="store_true", help="print the version number only")
    return top


def seconds(duration):
    """A Go duration as helm takes it (`300s`, `5m`, `1h30m`), in whole seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise argparse.ArgumentTypeError(f"invalid duration {duration!r} (for example 90s, 5m, 1h30m)")
    return max(1, math.ceil(sum(float(n) * units[u] for n, u in parts)))


def user_values(args):
    """The values given by -f and the --set family, composed in helm's order."""
    composed = {}
    for path in args.values:
        merge(composed, helm.values_from_yaml(read(path)))
    for parse, expressions in [
        (helm.parse_set_json, args.set_json),
        (helm.parse_set_string, args.set),
        (helm.parse_set_string_values, args.set_string),
        (helm.parse_set_file, args.set_file),
        (helm.parse_set_literal, args.set_literal),
    ]:
        for expression in expressions:
            merge(composed, parse(expression))
    return composed


def merge(into, values):
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def read(path):
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def config(args):
    # Without --kubeconfig the SDK resolves the cluster as helm does: $KUBECONFIG,
    # ~/.kube/config, then the in-cluster service account.
    return helm.Config(
        kubeconfig_path=option(args, "kubeconfig"),
        kube_context=option(args, "kube_context"),
        namespace=option(args, "namespace"),
    )


def option(args, name):
    return getattr(args, name, None)


def lint(args):
    failed = 0
    for chart in args.charts:
        report = helm.lint(chart, user_values(args), strict=args.strict, namespace=option(args, "namespace"),
                           kube_version=args.kube_version)
        print(f"==> Linting {chart}")
        worst = 0
        for message in report["messages"]:
            worst = max(worst, message["severity"])
            print(f"[{SEVERITIES.get(message['severity'], 'UNKNOWN')}] {message['path']}: {one_line(message['error'])}")
        # Errors that stopped the linting before any finding, such as a missing Chart.yaml.
        if not report["messages"]:
            for error in report["errors"]:
                print(f"[ERROR] {one_line(error)}")
        print()
        if report["errors"] or worst >= (2 if args.strict else 3):
            failed += 1
    summary = f"{len(args.charts)} chart(s) linted, {failed} chart(s) failed"
    if failed:
        raise UserError(summary)
    print(summary)


def template(args):
    # `helm template` is a client-only dry-run install: Helm renders, validates the
    # values against the chart's schema and orders the manifests as it would install them.
    if len(args.names) > 2:
        raise UserError(f"expected [NAME] CHART, got {' '.join(args.names)}")
    name, chart = args.names if len(args.names) == 2 else ("release-name", args.names[0])
    namespace = option(args, "namespace") or "default"
    release = config(args).install(chart, name, user_values(args), namespace=namespace, dry_run="client")
    sys.stdout.write(release["manifest"].lstrip("\n"))


def install(args):
    release = config(args).install(
        args.chart,
        args.name,
        user_values(args),
        namespace=option(args, "namespace"),
        create_namespace=args.create_namespace,
        wait=args.wait,
        timeout=args.timeout,
        rollback_on_failure=args.rollback_on_failure,
    )
    print_release(release)


def upgrade(args):
    cfg = config(args)
    if args.install and not exists(cfg, args.name):
        print(f'Release "{args.name}" does not exist. Installing it now.')
        return install(args)
    release = cfg.upgrade(
        args.chart,
        args.name,
        user_values(args),
        namespace=option(args, "namespace"),
        wait=args.wait,
        timeout=args.timeout,
        reuse_values=args.reuse_values,
        reset_values=args.reset_values,
        rollback_on_failure=args.rollback_on_failure,
    )
    print(f'Release "{args.name}" has been upgraded. Happy Helming!')
    print_release(release)


def exists(cfg, name):
    try:
        cfg.history(name, max_revisions=1)
        return True
    except helm.HelmNotFoundError:
        return False


def uninstall(args):
    result = config(args).uninstall(
        args.name,
        wait=args.wait,
        timeout=args.timeout,
        keep_history=args.keep_history,
        ignore_not_found=args.ignore_not_found,
    )
    if result.get("info"):
        print(result["info"])
    print(f'release "{args.name}" uninstalled')


def status(args):
    print_release(config(args).status(args.name))


def list_releases(args):
    releases = config(args).list(all_states=args.all, all_namespaces=args.all_namespaces)
    rows = [["NAME", "NAMESPACE", "REVISION", "UPDATED", "STATUS", "CHART", "APP VERSION"]]
    for r in releases:
        rows.append([
            r["name"],
            r["namespace"],
            str(r["revision"]),
            deployed_at(r).strftime("%Y-%m-%d %H:%M:%S %z %Z"),
            r["status"],
            f"{r['chart_name']}-{r['chart_version']}",
            r.get("app_version", ""),
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("\t".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def version(args):
    if args.short:
        print(helm.helm_sdk_version())
    else:
        print(f'version.BuildInfo{{Version:"{helm.helm_sdk_version()}", '
              f'HelmC:"{helm.helm_c_version()}", HelmPythonSDK:"{helm.__version__}"}}')


def print_release(release):
    print(f"NAME: {release['name']}")
    print(f"LAST DEPLOYED: {deployed_at(release).strftime('%a %b %e %H:%M:%S %Y')}")
    print(f"NAMESPACE: {release['namespace']}")
    print(f"STATUS: {release['status']}")
    print(f"REVISION: {release['revision']}")
    if release.get("notes"):
        print("NOTES:")
        print(release["notes"].rstrip("\n"))


def deployed_at(release):
    return datetime.fromisoformat(release["deployed_at"].replace("Z", "+00:00")).astimezone()


def one_line(message):
    """Helm's multi-line messages (schema violations, lint findings) on one line."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
