"""The ``backup`` commands, and the progress of backup and restore jobs."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from cargohold.cli.exits import EXIT_WARNING
from cargohold.cli.output import (
    emit,
    table,
)
from cargohold.core.sizes import format_size
from cargohold.errors import InvalidArgument

if TYPE_CHECKING:
    from cargohold.clients.api import ApiClient

def backup_command(api: ApiClient, args: argparse.Namespace, as_json: bool) -> int:
    if args.action == "target":
        if args.target_action == "set":
            body = {"url": args.url, "endpoint": args.endpoint, "region": args.region}
            if args.encryption_key_file:
                body["key"] = args.encryption_key_file.read_bytes().hex()
            shown = api.request("PUT", "/v1/backup-target", body)
        else:
            shown = api.request("GET", "/v1/backup-target")
        emit(shown, as_json, f"{shown['url']} at {shown['endpoint'] or 'AWS'}"
              f"{' (encrypted)' if shown['encrypted'] else ''}")
    elif args.action == "create":
        job = api.request("POST", "/v1/backups", {"volume": args.volume,
                                                  "snapshot": args.snapshot})
        job = follow_job(api, job, f"backing up {args.volume}") if args.wait else job
        emit(job, as_json, f"backup {job['id']} of {args.volume}: {job['state']}"
              + (f" ({format_size(job['bytes'])}, {format_size(job['new_bytes'])} new)"
                 if job["state"] == "complete" else ""))
    elif args.action == "ls":
        found = api.request("GET", "/v1/backups" + (f"?volume={args.volume}"
                                                      if args.volume else ""))
        if as_json:
            print(json.dumps(found, indent=2))
        else:
            print(table([[b["id"], b["volume"], b["snapshot"],
                           time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b["created"])),
                           b["state"], format_size(b["bytes"]), format_size(b["new_bytes"])]
                          for b in found],
                         ["ID", "VOLUME", "SNAPSHOT", "CREATED", "STATE", "SIZE", "NEW"]))
    elif args.action == "inspect":
        shown = api.request("GET", f"/v1/backups/{args.id}")
        emit(shown, as_json, "\n".join(f"{k + ':':<12} {v}" for k, v in shown.items()))
    elif args.action == "job":
        job = api.request("GET", f"/v1/backup-jobs/{args.id}")
        emit(job, as_json, f"{job['kind']} {job['id']} of {job['volume']}: {job['state']} "
              f"{job['progress']:.0%}" + (f": {job['error']}" if job["error"] else ""))
    elif args.action == "verify":
        job = api.request("POST", f"/v1/backups/{args.id}/verify?wait=false")
        job = follow_job(api, job, f"verifying backup {args.id}")
        job["ok"] = job["state"] == "complete" and not job["bad"]
        emit(job, as_json, f"backup {args.id}: " + (
            f"not verified: {job['error']}" if job["state"] != "complete" else
            f"{job['blocks']} blocks checked, " + ("all good" if job["ok"] else "bad: " + "; ".join(
                f"{name}: {why}" for name, why in job["bad"].items()))))
        return 0 if job["ok"] else EXIT_WARNING
    elif args.action == "rm":
        shown = api.request("DELETE", f"/v1/backups/{args.id}")
        emit(shown, as_json, f"backup {args.id} removed; "
              + ("its blocks are collected once no backup runs" if shown["deferred"]
                 else f"{shown['deleted']} blocks no backup needs deleted"))
    elif args.action == "schedule" and args.off:
        api.request("DELETE", f"/v1/backup-schedules/{args.volume}")
        emit({"volume": args.volume, "scheduled": False}, as_json,
              f"{args.volume}: no scheduled backups")
    elif args.action == "schedule":
        if not args.every:
            raise InvalidArgument(what="--every", detail="say how often (or --off)")
        shown = api.request("PUT", f"/v1/backup-schedules/{args.volume}",
                            {"every": args.every, "keep": args.keep})
        emit(shown, as_json, f"{args.volume}: a backup every {shown['every']:g} s, "
              + (f"the newest {shown['keep']} kept" if shown["keep"] else "all kept"))
    elif args.action == "schedules":
        found = api.request("GET", "/v1/backup-schedules")
        if as_json:
            print(json.dumps(found, indent=2))
        else:
            print(table([[s["volume"], f"{s['every']:g}s", str(s["keep"] or "all"),
                           time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["last_started"]))
                           if s["last_started"] else "-", s["last_job"] or "-"]
                          for s in found], ["VOLUME", "EVERY", "KEEP", "LAST STARTED", "JOB"]))
    elif args.action == "restore":
        job = api.request("POST", f"/v1/backups/{args.id}/restore",
                          {"to": args.to, "replicas": args.replicas, "standby": args.standby})
        job = follow_job(api, job, f"restoring {args.to}") if args.wait else job
        emit(job, as_json, f"{args.to} from backup {args.id}: {job['state']}")
    failed = args.action in ("create", "restore") and args.wait and job["state"] == "failed"
    return EXIT_WARNING if failed else 0


def follow_job(api: ApiClient, job: dict[str, Any], what: str) -> dict[str, Any]:
    """Show a backup or restore job's progress (on stderr) until it ends."""
    while job["state"] == "running":
        done = float(job.get("progress", 0.0))
        print(f"\r{what} [{'#' * int(30 * done):<30}] {done * 100:3.0f}%", end="",
              file=sys.stderr, flush=True)
        time.sleep(0.5)
        job = api.request("GET", f"/v1/backup-jobs/{job['id']}")
    print(f"\r{what} [{'#' * 30}] {job['state']}" + (f": {job['error']}" if job["error"]
                                                     else ""), file=sys.stderr)
    return job
