"""How the command line prints what the API returns: tables, or JSON with ``-o json``."""

from __future__ import annotations

import json
import time
from typing import Any

from cargohold.core.sizes import format_size


def scrub_text(report: dict[str, Any]) -> str:
    lines = [f"{report['volume']}: {report['chunks']} chunks read from every in-sync copy "
             f"({format_size(report['bytes_read'])}) in {report['seconds']:.1f} s",
             f"repaired: {len(report['repaired'])} copies",
             f"lost: {len(report['lost'])} chunks without a clean copy"]
    lines += [f"  chunk {r['chunk']} on data server {r['server']}" for r in report["repaired"]]
    if report["lost"]:
        lines.append(f"  lost chunks: {', '.join(str(c) for c in report['lost'])}")
    if report["skipped"]:
        lines.append(f"not checked (unreachable): {', '.join(report['skipped'])}")
    return "\n".join(lines)


def emit(value: Any, as_json: bool, text: str) -> None:
    print(json.dumps(value, indent=2) if as_json else text)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["   ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def print_volumes(volumes: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(volumes, indent=2))
        return
    rows = [[v["name"], format_size(v["size"]), f"{v['in_sync']}/{v['replica_count']}",
             v["fs"], v["state"], (v["attachment"] or {}).get("node", "")] for v in volumes]
    print(table(rows, ["NAME", "SIZE", "REPLICAS", "FS", "STATE", "NODE"]))


def print_inspect(volume: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(volume, indent=2))
        return
    att = volume["attachment"] or {}
    used = volume.get("used")
    lines = [f"Name:        {volume['name']}", f"ID:          {volume['id']}",
             f"Size:        {format_size(volume['size'])} (thin; "
             f"{format_size(used) if used is not None else '?'} written)",
             f"Filesystem:  {volume['fs']}", f"State:       {volume['state']}",
             f"Attached:    {att.get('node', '-')} {att.get('mountpoint', '')}".rstrip(),
             f"Replicas:    {volume['in_sync']} of {volume['replica_count']} in sync",
             f"Locality:    {volume.get('locality', 'best-effort')}"]
    if volume.get("origin"):
        lines.append(f"Clone of:    {volume['source']} (filling, {volume['filled']:.0%} "
                     "copied: depends on it until filled)")
    elif volume.get("source"):
        lines.append(f"Clone of:    {volume['source']}")
    if volume.get("standby"):
        lines.append(f"Standby:     follows the backups of {volume['standby']}, holds "
                     f"{volume['restoring']} (activate to attach)")
    elif volume.get("restoring"):
        lines.append(f"Restoring:   from backup {volume['restoring']} (not attachable yet)")
    if volume.get("replication"):
        lines.append(f"Replicated:  {replication_text(volume['replication'])}")
    if volume.get("standby_state"):
        lines.append(f"Standby:     {volume['standby_state']} on another cluster (promote to "
                     "attach)")
    if volume.get("promoted_from"):
        came = volume["promoted_from"]
        lines.append(f"Promoted:    from a standby of {came['volume']} (point {came['point']}) "
                     + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(came["at"])))
    if volume.get("migration"):
        lines.append(f"Migration:   {migration_text(volume['migration'])}")
    if volume.get("fenced_by"):
        lines.append(f"Fenced:      {volume['fenced_by']}")
    last = volume.get("last_backup")
    if last:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["finished"] or
                                                                   last["started"]))
        lines.append(f"Backup:      {last['id']} {last['state']} {when}"
                     + (f" ({format_size(last['bytes'])}, {format_size(last['new_bytes'])} "
                        "new)" if last["state"] == "complete" else "")
                     + (f": {last['error']}" if last["error"] else ""))
    if volume.get("last_error"):
        lines.append(f"Last error:  {volume['last_error']}")
    print("\n".join(lines))
    rows = [[r["server"][:12], r.get("node") or "?", r.get("path") or "?", replica_state(r),
             format_size(r["used"]) if r.get("used") is not None else "?", r.get("reason", "")]
            for r in volume["replicas"]]
    print(table(rows, ["SERVER", "NODE", "PATH", "STATE", "USED", "REASON"]))


def replica_state(replica: dict[str, Any]) -> str:
    if replica["state"] == "resyncing":
        return f"resyncing {replica.get('progress', 0) * 100:.0f}%"
    return str(replica["state"])


def print_nodes(nodes: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(nodes, indent=2))
        return
    rows = []
    for node in nodes:
        seen = f"{max(0, time.time() - node['last_seen']):.0f}s ago"
        role = ",".join(r for r in ("controller", "draining") if node.get(r))
        rows.append([node["name"], node["health"], seen, role, "", format_size(node["capacity"]),
                     format_size(node["free"]), format_size(node["used"]),
                     format_size(node["provisioned"])])
        for server in node["data_servers"]:
            rows.append(["", server["health"], "", "", f"{server['id'][:12]} {server['path']}",
                         format_size(server["capacity"]), format_size(server["free"]),
                         format_size(server["used"]), format_size(server["provisioned"])])
    print(table(rows, ["NODE", "HEALTH", "LAST SEEN", "ROLE", "DATA SERVER", "CAPACITY",
                        "FREE", "USED", "PROVISIONED"]))


def replication_text(rep: dict[str, Any]) -> str:
    """One line on a volume's copy to another cluster."""
    text = f"to {rep['remote']} every {rep['every']:g} s; "
    if rep["point"]:
        text += f"remote holds point {rep['point']}, lag {rep['lag']:.0f} s"
        if rep["last_bytes"]:
            text += f" (last copy {format_size(rep['last_bytes'])})"
    else:
        text += "no complete copy yet"
    if rep["sending"]:
        text += f"; sending {rep['progress']:.0%}"
    if rep["last_error"]:
        text += f"; last copy failed: {rep['last_error']}"
    return text


def migration_text(moving: dict[str, Any]) -> str:
    """One line on a volume's migration to another cluster."""
    rounds = moving["rounds"]
    sent = ", ".join(format_size(int(r["bytes"])) for r in rounds)
    text = f"to {moving['remote']}: {moving['state']}; {len(rounds)} round(s)"
    text += f" ({sent})" if rounds else ""
    if moving["state"] == "done":
        text += f"; writes held {moving['held'] * 1000:.0f} ms"
    if moving["error"]:
        text += f": {moving['error']}"
    return text
