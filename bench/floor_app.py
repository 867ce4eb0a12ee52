"""The floor under the service overhead: BentoML with nothing to do (`make bench-overhead`).

`Outer.direct` answers a small JSON body at once; `Outer.hop` asks `Inner` for
it first, through BentoML's own client, as the HTTP service asks the render
service. `Inner` keeps no access log and no request metrics, as our render
service. What these cost is what any two-service BentoML app pays per request
on the same machine, before any image work.
"""

from __future__ import annotations

import bentoml


@bentoml.service(
    name="floor-inner", logging={"access": {"enabled": False}}, metrics={"enabled": False}
)
class Inner:
    @bentoml.api
    async def echo(self, x: int = 0) -> dict[str, int]:
        return {"x": x}


@bentoml.service(name="floor-outer")
class Outer:
    inner = bentoml.depends(Inner)

    @bentoml.api
    async def direct(self, x: int = 0) -> dict[str, int]:
        return {"x": x}

    @bentoml.api
    async def hop(self, x: int = 0) -> dict[str, int]:
        return dict(await self.inner.to_async.echo(x=x))
