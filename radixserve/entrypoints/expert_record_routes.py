"""SGLang's expert-load recorder routes: POST /start_expert_distribution_record,
/stop_expert_distribution_record and /dump_expert_distribution_record.

A dump answers with the record as JSON (mode, moe_layers, logical_count per layer and
logical expert, per pass or per token by mode) and also writes it to a file in the
temporary directory, whose path the answer names. Without
--expert-distribution-recorder-mode each route answers 400 naming the flag.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response


def add_expert_record_routes(app: FastAPI, tm: Any) -> None:
    async def ask(action: str) -> Response:
        reply = await tm.expert_distribution(action)
        if not reply.success:
            return JSONResponse({"error": {"message": reply.message,
                                           "param": "expert_distribution_recorder_mode"}},
                                status_code=400)
        if reply.record is None:
            return JSONResponse({"success": True})
        path = Path(tempfile.gettempdir()) / f"expert_distribution_record_{time.time_ns()}.json"
        path.write_text(json.dumps(reply.record))
        return JSONResponse({"success": True, "path": str(path), **reply.record})

    @app.post("/start_expert_distribution_record")
    async def start_record() -> Response:
        return await ask("start")

    @app.post("/stop_expert_distribution_record")
    async def stop_record() -> Response:
        return await ask("stop")

    @app.post("/dump_expert_distribution_record")
    async def dump_record() -> Response:
        return await ask("dump")
