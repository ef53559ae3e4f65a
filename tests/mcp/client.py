"""A real MCP client for tests/mcp.rs: the official Python SDK (mcp 2.x) speaking to toolgate.

    python client.py URL API_KEY PLAN_JSON

PLAN_JSON: {"mode": "auto" | "2026-07-28" | "2025-11-25" | "2025-06-18",
            "calls": [{"tool": "...", "args": {...}, "meta": {...}}]}

Prints one JSON line: {"negotiated": "<revision>", "session_id": ..., "tools": [...],
"calls": [{"result": CallToolResult} | {"error": {"code", "message", "data"}}]}.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
import mcp_types as types
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

INFO = types.Implementation(name="toolgate-tests", version="1.0")


def dump(model: Any) -> Any:
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


async def open_session(session: ClientSession, mode: str) -> None:
    if mode in MODERN_PROTOCOL_VERSIONS:
        await session.discover()
    elif mode == "2025-11-25":
        await session.initialize()
    elif mode == "2025-06-18":
        # The SDK always offers its newest handshake revision; offer the older one by hand,
        # then do what initialize() does.
        result = await session.send_request(
            types.InitializeRequest(
                params=types.InitializeRequestParams(
                    protocol_version="2025-06-18", capabilities=types.ClientCapabilities(), client_info=INFO
                )
            ),
            types.InitializeResult,
        )
        session.adopt(result)
        await session.send_notification(types.InitializedNotification())
    else:  # auto: server/discover first, the handshake if that fails
        try:
            await session.discover()
        except MCPError:
            await session.initialize()


async def main(url: str, key: str, plan: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"calls": []}
    headers = {"Authorization": f"Bearer {key}"} if key else None
    async with create_mcp_http_client(headers=headers) as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write, client_info=INFO) as session:
                try:
                    await open_session(session, plan.get("mode", "auto"))
                except MCPError as e:
                    out["open_error"] = dump(e.error)
                    return out
                out["negotiated"] = session.protocol_version
                try:
                    listed = await session.list_tools()
                    out["tools"] = [dump(t) for t in listed.tools]
                except MCPError as e:
                    out["list_error"] = dump(e.error)
                for call in plan.get("calls", []):
                    try:
                        meta = call.get("meta")
                        result = await session.call_tool(call["tool"], call.get("args", {}), meta=meta)
                        out["calls"].append({"result": dump(result)})
                    except MCPError as e:
                        out["calls"].append({"error": dump(e.error)})
    return out


if __name__ == "__main__":
    result = anyio.run(main, sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
    print(json.dumps(result))
