"""The aggregation tutorial, client side: enqueue one message into a group.

    python examples/aggregation/client.py --dsn postgresql://localhost/app --message hi
    python examples/aggregation/client.py --dsn postgresql://localhost/app --message there

Run it a few times, then look at the waiting members:

    pgq task ls --queue tutorial --state aggregating
    pgq group ls --queue tutorial

Without --dsn, PGQ_DSN is used, else pgq's embedded PostgreSQL.
"""

from __future__ import annotations

import argparse

import pgq


def main() -> None:
    parser = argparse.ArgumentParser(description="Enqueue a message into an aggregation group.")
    parser.add_argument("--dsn", default=None, help="PostgreSQL DSN (default: $PGQ_DSN or embedded)")
    parser.add_argument("--message", default="hello", help="the message to enqueue")
    parser.add_argument("--queue", default="tutorial")
    parser.add_argument("--group", default="example-group")
    args = parser.parse_args()

    with pgq.Client(args.dsn) as client:
        task = pgq.Task("aggregation-tutorial", args.message)
        info = client.enqueue(task, queue=args.queue, group=args.group)
    print(f"enqueued task {info.id}: state={info.state} queue={info.queue} group={info.group}")


if __name__ == "__main__":
    main()
