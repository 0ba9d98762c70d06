"""Pitfall: the loop shuts down with work still pending, and that work is lost."""

import asyncio
import sys

background: set[asyncio.Task[None]] = set()


async def flush_audit_log(entries: list[str]) -> None:
    await asyncio.sleep(0.5)  # writing to a remote store
    print("flushed", len(entries), "entries")  # never printed


async def main() -> None:
    task = asyncio.create_task(flush_audit_log(["login", "logout"]))  # started, never awaited
    background.add(task)
    await asyncio.sleep(0.1)
    # main returns: asyncio.run cancels flush_audit_log half-way


if "--uvloop" in sys.argv:
    import uvloop

    uvloop.run(main())
else:
    asyncio.run(main())
