"""Pitfall: two loops in two threads, and one waits for the other without awaiting."""

import asyncio
import sys
import threading

if "--uvloop" in sys.argv:
    import uvloop

    new_loop, run = uvloop.new_event_loop, uvloop.run
else:
    new_loop, run = asyncio.new_event_loop, asyncio.run

# A second loop in its own thread, as a database client library might keep.
db_loop = new_loop()
db_thread = threading.Thread(target=db_loop.run_forever)
db_thread.start()


async def query(sql: str) -> list[str]:
    await asyncio.sleep(0.3)  # the database takes its time
    return ["row"]


async def handle_request() -> None:
    future = asyncio.run_coroutine_threadsafe(query("SELECT 1"), db_loop)
    rows = future.result()  # waits in this thread: this loop is blocked meanwhile
    print("rows:", rows)


async def main() -> None:
    await asyncio.create_task(handle_request(), name="request-1")


run(main())
db_loop.call_soon_threadsafe(db_loop.stop)
db_thread.join()
db_loop.close()
