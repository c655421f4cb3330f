"""The manual page cargohold(1), written from the command line's own parser: every command,
its usage and its options, as ``--help`` gives them, in roff. The Debian package installs it
(scripts/build-deb.sh runs ``python -m cargohold.cli.manual``)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Iterator

from cargohold import __version__
from cargohold.cli import exits
from cargohold.cli.parser import build

FILES = (
    ("/etc/cargohold/node.toml", "the node's settings (Debian package): every key is a flag "
     "of cargohold node"),
    ("/var/lib/cargohold", "the node's state: metadata, TLS keys, logs, mounts; and the "
     "default data directories, which hold the replicas of volumes"),
    ("/run/cargohold/api.sock", "the node's API, which the commands use by default"),
)


def escape(text: str) -> str:
    """Text as roff prints it: backslashes and hyphens kept, no line read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.splitlines())


def commands(parser: argparse.ArgumentParser, path: str,
             summary: str) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """Every command under ``parser``, depth first: its words, its summary and its parser."""
    yield path, summary, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield from commands(sub, f"{path} {name}", helps.get(name, ""))


def options(parser: argparse.ArgumentParser) -> Iterator[str]:
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or \
                action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            metavar = "" if action.nargs == 0 else " " + (
                str(action.metavar) if action.metavar is not None else
                "{" + ",".join(map(str, action.choices)) + "}" if action.choices else
                action.dest.upper())
            label = ", ".join(f"\\fB{escape(o)}\\fR" for o in action.option_strings)
            label += escape(metavar)
        else:
            label = f"\\fI{escape(str(action.metavar or action.dest))}\\fR"
        text = (action.help or "") % {"default": action.default, "prog": parser.prog} \
            if action.help and "%(" in action.help else action.help or ""
        yield f".TP\n{label}\n{escape(text)}" if text else f".TP\n{label}\n"


def render(parser: argparse.ArgumentParser) -> str:
    lines = [f'.TH CARGOHOLD 1 "" "cargohold {escape(__version__)}" "cargohold manual"',
             ".ad l", ".nh",  # long usage lines: left-adjusted, not hyphenated
             ".SH NAME",
             "cargohold \\- persistent, replicated block volumes for containers",
             ".SH SYNOPSIS",
             "\\fBcargohold\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR ...",
             ".SH DESCRIPTION",
             escape(textwrap.dedent("""\
                 cargohold pools the disks of many hosts into thin-provisioned volumes,
                 replicated across hosts and attached to one host at a time as a real file
                 system, for Docker (volume plugin), Kubernetes (CSI), a REST API and this
                 command line. One node runs on each host (cargohold node); the other commands
                 ask a node through its API.""")),
             ".SH OPTIONS"]
    lines += options(parser)
    lines.append(".SH COMMANDS")
    for path, summary, sub in list(commands(parser, "cargohold", ""))[1:]:
        usage = " ".join(sub.format_usage().removeprefix("usage: ").split())
        usage = escape(usage).replace(",", ",\\:")  # {create,ls,...} may break after commas
        lines += [f".SS {escape(path)}", escape(summary) if summary else "", ".PP",
                  f"\\fB{usage}\\fR"]
        if sub.description:
            lines += [".PP", escape(" ".join(sub.description.split()))]
        lines += options(sub)
    lines.append(".SH FILES")
    for path, what in FILES:
        lines += [".TP", f"\\fI{escape(path)}\\fR", escape(what)]
    lines += [".SH ENVIRONMENT", ".TP", "\\fBCARGOHOLD_HOST\\fR, \\fBCARGOHOLD_TOKEN\\fR, "
              "\\fBCARGOHOLD_CA\\fR", "the defaults of \\fB\\-\\-host\\fR, "
              "\\fB\\-\\-token\\-file\\fR and \\fB\\-\\-ca\\fR",
              ".SH EXIT STATUS", escape(" ".join((exits.__doc__ or "").split())),
              ".SH SEE ALSO", "docker(1), systemctl(1), and /usr/share/doc/cargohold/README.md"]
    return "\n".join(line for line in lines if line) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render(build()))
