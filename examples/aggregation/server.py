"""The aggregation tutorial, server side: aggregate a group's messages into one task.

    python examples/aggregation/server.py --dsn postgresql://localhost/app \\
        --grace-period 10s --max-delay 30s --max-size 20

The group is aggregated 10 s after its newest message, at the latest 30 s after
its oldest one, or at once when it holds 20 messages. The server logs
"Aggregating N tasks from group ..." and the handler prints the joined messages.
Stop it with Ctrl-C. Durations are written like 500ms, 10s, 2m, 1h.
"""

from __future__ import annotations

import argparse
import logging

import pgq

log = logging.getLogger("tutorial")


def aggregate(group: str, tasks: list[pgq.Task]) -> pgq.Task:
    log.info("Aggregating %d tasks from group %s", len(tasks), group)
    return pgq.Task("aggregated-task", "\n".join(str(t.payload) for t in tasks))


def handle_aggregated(task: pgq.Task) -> None:
    print(f"Handling aggregated task {task.id}; messages:\n{task.payload}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a pgq server that aggregates the tutorial group.")
    parser.add_argument("--dsn", default=None, help="PostgreSQL DSN (default: $PGQ_DSN or embedded)")
    parser.add_argument("--queue", default="tutorial")
    parser.add_argument("--grace-period", default="10s", help="wait this long after the newest message")
    parser.add_argument("--max-delay", default="30s", help="never wait longer than this after the oldest")
    parser.add_argument("--max-size", type=int, default=20, help="aggregate at once at this many messages")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pgq.services.aggregator").setLevel(logging.WARNING)  # the tutorial logs its own line

    mux = pgq.ServeMux()
    mux.handle("aggregated-task", handle_aggregated)
    server = pgq.Server(
        args.dsn,
        queues={args.queue: 1},
        group_aggregator=aggregate,
        group_grace_period=args.grace_period,
        group_max_delay=args.max_delay,
        group_max_size=args.max_size,
    )
    server.run(mux)


if __name__ == "__main__":
    main()
