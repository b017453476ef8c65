"""`meterline api`: balance, entitlement checks, usage, ledger, dispute CSV export,
manual grants and customers over HTTP (aiohttp + one asyncpg pool); see schemas/openapi.yaml.

`ApiServer` starts and stops it in-process (tests, `meterline dev`); `run(settings)`
is the blocking entry point of `meterline api`.
"""

from meterline.api.server import ApiServer, run

__all__ = ["ApiServer", "run"]
