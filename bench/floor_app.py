"""The bare-framework floor for the HTTP benches: FastAPI on uvicorn, nothing else.

Two routes that do what a framework does for any route (parse a JSON body with pydantic,
answer JSON) and no work of their own: ``/sync`` is a plain ``def`` (run in the thread pool,
as most sandboxsec routes are), ``/async`` an ``async def`` (run on the event loop).  The
benches serve it with the same uvicorn settings and worker count as ``sandboxsec serve`` and
drive it with the same clients, so "pairs/s against the floor" is an honest ratio on a
machine shared with other work.
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel


class Body(BaseModel):
    nonce: str = ""


class Answer(BaseModel):
    nonce: str
    status: str


app = FastAPI()


@app.post("/sync", response_model=Answer)
def sync_route(body: Body) -> Answer:
    """A plain ``def`` route."""
    return Answer(nonce=body.nonce, status="ok")


@app.post("/async", response_model=Answer)
async def async_route(body: Body) -> Answer:
    """An ``async def`` route."""
    return Answer(nonce=body.nonce, status="ok")
