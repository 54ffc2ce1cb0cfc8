#!/usr/bin/env python3
"""A stand-in for the `session-broker` binary, for checking `pcc_interop.py` itself.

NOT the specification (docs/pcc-cli-api.md is) and not a reference implementation: it answers
the private and public API the way that document says the broker should, with the same command
line as the binary (`serve` by default, `tokens create --org ORG`, `echo-bot --listen ADDR`), so
that the interoperability test can be run and debugged before the real private API exists:

    tests/cli/run.sh tests/cli/stub_broker.py

It needs aiohttp (which `pipecatcloud` already brings into the test's venv). It keeps its state
in memory; private tokens made by `tokens create` go through a file named after
BROKER__REDIS__URL, so the two processes agree the way the real ones agree through Redis.
"""

import asyncio
import base64
import hashlib
import json
import os
import secrets
import sys
import tempfile
import uuid
from datetime import UTC, datetime

from aiohttp import WSMsgType, web
import aiohttp


def _state_file() -> str:
    url = os.environ.get("BROKER__REDIS__URL", "memory")
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"stub-broker-tokens-{digest}.json")


def _load_tokens() -> dict:
    try:
        with open(_state_file()) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _log(message: str, **fields) -> None:
    line = {"timestamp": _now(), "level": "INFO", "message": message, **fields}
    print(json.dumps(line), flush=True)


def _error(status: int, message: str, reason: str) -> web.Response:
    body = {
        "error": message,
        "code": str(status),
        "reason": reason,
        "status": status,
        "message": message,
        "detail": message,
    }
    return web.json_response(body, status=status)


class Broker:
    def __init__(self, region: str, bot_url: str):
        self.region = region
        self.bot_url = bot_url
        self.ws_base = ""
        self.agents: dict[tuple[str, str], dict] = {}
        self.keys: dict[str, list[dict]] = {}
        self.sessions: dict[str, dict] = {}
        self.events: list[dict] = []
        self.live: dict[str, web.WebSocketResponse] = {}

    # ---- auth

    def private_org(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return None
        token = header[len("Bearer ") :]
        digest = hashlib.sha256(token.encode()).hexdigest()
        return _load_tokens().get(digest)

    def authorize(self, request: web.Request, org: str | None) -> web.Response | None:
        token_org = self.private_org(request)
        if token_org is None:
            return _error(401, "Unauthorized", "unauthorized")
        if org is not None and org != token_org:
            return _error(403, f"This token may not act for organization '{org}'", "forbidden")
        return None

    # ---- helpers

    def event(self, org: str, agent: str, session_id: str, text: str) -> None:
        self.events.append(
            {"org": org, "agent": agent, "sessionId": session_id, "timestamp": _now(), "log": text}
        )

    def end_session(self, session: dict, end_state: str) -> None:
        if session["endedAt"] is None:
            session["endedAt"] = _now()
            session["endState"] = end_state
            self.event(
                session["org"],
                session["agent"],
                session["sessionId"],
                f"session {session['sessionId']} ended ({end_state})",
            )

    def status_body(self, agent: dict) -> dict:
        active = sum(
            1
            for s in self.sessions.values()
            if s["org"] == agent["org"] and s["agent"] == agent["name"] and s["endedAt"] is None
        )
        spec = {"image": agent.get("image")}
        if agent.get("maxSessionDuration") is not None:
            spec["maxSessionDurationSeconds"] = agent["maxSessionDuration"]
        return {
            "name": agent["name"],
            "region": agent["region"],
            "ready": True,
            "available": True,
            "activeDeploymentId": agent["deploymentId"],
            "desiredDeploymentId": agent["deploymentId"],
            "reconciledDeploymentId": agent["deploymentId"],
            "activeSessionCount": active,
            "websocketAuth": agent["websocketAuth"],
            "deployment": {"id": agent["deploymentId"], "manifest": {"spec": spec}},
            "autoScaling": {
                "minReplicas": agent["minAgents"],
                "maxReplicas": agent["maxAgents"],
            },
            "agentProfile": agent.get("agentProfile"),
            "krispViva": {"audioFilter": None},
            "errors": [],
            "createdAt": agent["createdAt"],
            "updatedAt": agent["updatedAt"],
        }

    # ---- organizations

    async def organizations(self, request: web.Request) -> web.Response:
        denied = self.authorize(request, None)
        if denied:
            return denied
        org = self.private_org(request)
        return web.json_response({"organizations": [{"name": org, "verboseName": org}]})

    async def regions(self, request: web.Request) -> web.Response:
        denied = self.authorize(request, request.match_info["org"])
        if denied:
            return denied
        return web.json_response({"regions": [{"code": self.region, "display_name": self.region}]})

    async def properties(self, request: web.Request) -> web.Response:
        denied = self.authorize(request, request.match_info["org"])
        if denied:
            return denied
        return web.json_response({"properties": {"defaultRegion": self.region}})

    # ---- services

    async def services(self, request: web.Request) -> web.Response:
        org = request.match_info["org"]
        denied = self.authorize(request, org)
        if denied:
            return denied
        if request.method == "GET":
            items = [
                {
                    "id": a["id"],
                    "name": a["name"],
                    "region": a["region"],
                    "activeDeploymentId": a["deploymentId"],
                    "createdAt": a["createdAt"],
                    "updatedAt": a["updatedAt"],
                }
                for (o, _), a in self.agents.items()
                if o == org
            ]
            return web.json_response({"services": items})
        try:
            payload = await request.json()
        except Exception:
            return _error(400, "Malformed JSON", "bad_request")
        name = payload.get("serviceName")
        if not isinstance(name, str) or not name:
            return _error(400, "serviceName is required", "bad_request")
        existing = self.agents.get((org, name))
        if request.method == "POST" and existing:
            return _error(409, f"Agent '{name}' already exists", "conflict")
        if request.method == "PUT" and not existing:
            return _error(404, f"Agent '{name}' not found", "not_found")
        scaling = payload.get("autoScaling") or {}
        now = _now()
        agent = existing or {"id": str(uuid.uuid4()), "org": org, "name": name, "createdAt": now}
        agent.update(
            {
                "region": payload.get("region") or self.region,
                "image": payload.get("image"),
                "websocketAuth": payload.get("websocketAuth") or "none",
                "maxSessionDuration": payload.get("maxSessionDuration"),
                "minAgents": scaling.get("minAgents", 0),
                "maxAgents": scaling.get("maxAgents") or 50,
                "agentProfile": payload.get("agentProfile"),
                "deploymentId": str(uuid.uuid4()),
                "updatedAt": now,
            }
        )
        self.agents[(org, name)] = agent
        status = 201 if request.method == "POST" else 200
        return web.json_response({"body": self.status_body(agent)}, status=status)

    async def service(self, request: web.Request) -> web.Response:
        org, name = request.match_info["org"], request.match_info["agent"]
        denied = self.authorize(request, org)
        if denied:
            return denied
        agent = self.agents.get((org, name))
        if not agent:
            return _error(404, f"Agent '{name}' not found", "agent_not_found")
        if request.method == "DELETE":
            del self.agents[(org, name)]
            return web.json_response({"name": name, "deleted": True})
        return web.json_response({"body": self.status_body(agent)})

    # ---- sessions and logs

    async def sessions_list(self, request: web.Request) -> web.Response:
        org, name = request.match_info["org"], request.match_info["agent"]
        denied = self.authorize(request, org)
        if denied:
            return denied
        if (org, name) not in self.agents:
            return _error(404, f"Agent '{name}' not found", "agent_not_found")
        want = request.query.get("endState")
        items = [
            {k: v for k, v in s.items() if k not in ("org", "agent")}
            for s in self.sessions.values()
            if s["org"] == org and s["agent"] == name and (not want or s["endState"] == want)
        ]
        return web.json_response({"sessions": items})

    async def session(self, request: web.Request) -> web.Response:
        org, name = request.match_info["org"], request.match_info["agent"]
        denied = self.authorize(request, org)
        if denied:
            return denied
        session = self.sessions.get(request.match_info["id"])
        if not session or session["org"] != org or session["agent"] != name:
            return _error(404, "Session not found", "session_not_found")
        if request.method == "DELETE":
            self.end_session(session, "terminated")
            ws = self.live.pop(session["sessionId"], None)
            if ws is not None:
                await ws.close(code=4000, message=b"session terminated")
            return web.json_response({"sessionId": session["sessionId"], "terminated": True})
        return web.json_response({k: v for k, v in session.items() if k not in ("org", "agent")})

    async def logs(self, request: web.Request) -> web.Response:
        org, name = request.match_info["org"], request.match_info["agent"]
        denied = self.authorize(request, org)
        if denied:
            return denied
        sid = request.query.get("sessionId")
        limit = int(request.query.get("limit", "100"))
        items = [
            {"timestamp": e["timestamp"], "log": e["log"], "sessionId": e["sessionId"]}
            for e in self.events
            if e["org"] == org and e["agent"] == name and (not sid or e["sessionId"] == sid)
        ]
        return web.json_response({"logs": items[-limit:]})

    # ---- public keys

    async def api_keys(self, request: web.Request) -> web.Response:
        org = request.match_info["org"]
        denied = self.authorize(request, org)
        if denied:
            return denied
        keys = self.keys.setdefault(org, [])
        if request.method == "GET":
            public = [
                {
                    "id": k["id"],
                    "key": k["display"],
                    "metadata": {"name": k["name"]},
                    "createdAt": k["createdAt"],
                    "revoked": k["revoked"],
                }
                for k in keys
            ]
            return web.json_response({"public": public})
        payload = await request.json()
        key = "pk_" + secrets.token_hex(20)
        record = {
            "id": str(uuid.uuid4()),
            "name": payload.get("name"),
            "hash": hashlib.sha256(key.encode()).hexdigest(),
            "display": key[:10] + "…",
            "createdAt": _now(),
            "revoked": False,
        }
        keys.append(record)
        body = {
            "id": record["id"],
            "key": key,
            "metadata": {"name": record["name"]},
            "createdAt": record["createdAt"],
            "revoked": False,
        }
        return web.json_response(body, status=201)

    async def api_key(self, request: web.Request) -> web.Response:
        org = request.match_info["org"]
        denied = self.authorize(request, org)
        if denied:
            return denied
        for k in self.keys.get(org, []):
            if k["id"] == request.match_info["id"]:
                k["revoked"] = True
                return web.json_response({"id": k["id"], "revoked": True})
        return _error(404, "API key not found", "key_not_found")

    # ---- public API

    async def start(self, request: web.Request) -> web.Response:
        name = request.match_info["agent"]
        header = request.headers.get("Authorization", "")
        key = header[len("Bearer ") :] if header.startswith("Bearer ") else ""
        digest = hashlib.sha256(key.encode()).hexdigest()
        org = None
        for o, keys in self.keys.items():
            if any(k["hash"] == digest and not k["revoked"] for k in keys):
                org = o
        if org is None:
            return _error(401, "Unauthorized", "unauthorized")
        agent = self.agents.get((org, name))
        if not agent:
            return _error(404, f"Service '{name}' not found", "agent_not_found")
        raw = await request.read()
        try:
            payload = json.loads(raw or b"{}")
        except ValueError:
            return _error(400, "Malformed JSON", "bad_request")
        if payload.get("createDailyRoom"):
            return _error(400, "This agent serves websocket transport only", "transport")
        session_id = str(uuid.uuid4())
        token = secrets.token_urlsafe(24)
        self.sessions[session_id] = {
            "sessionId": session_id,
            "org": org,
            "agent": name,
            "token": token,
            "createdAt": _now(),
            "endedAt": None,
            "endState": "active",
            "botStartSeconds": None,
            "coldStart": False,
            "completionStatus": None,
        }
        self.event(org, name, session_id, f"session {session_id} started")
        answer = {
            "token": token,
            "wsUrl": f"{self.ws_base}/ws/generic/{name}.{org}",
            "sessionId": session_id,
        }
        if "body" in payload:
            # The stub re-serializes; the real broker answers the exact bytes the client sent.
            answer["body"] = base64.b64encode(json.dumps(payload["body"]).encode()).decode()
        return web.json_response(answer)

    async def ws(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        session = next((s for s in self.sessions.values() if s.get("token") == token), None)
        if not session or f"{session['agent']}.{session['org']}" != request.match_info["sh"]:
            return _error(403, "Invalid token", "token_invalid")
        session["token"] = None  # one time
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = session["sessionId"]
        self.live[sid] = ws
        self.event(session["org"], session["agent"], sid, f"session {sid} connected")
        session["botStartSeconds"] = 0.0
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(self.bot_url) as bot:

                async def bot_to_client():
                    async for msg in bot:
                        if msg.type == WSMsgType.TEXT:
                            await ws.send_str(msg.data)
                        elif msg.type == WSMsgType.BINARY:
                            await ws.send_bytes(msg.data)

                relay = asyncio.create_task(bot_to_client())
                async for msg in ws:
                    if msg.type == WSMsgType.TEXT:
                        await bot.send_str(msg.data)
                    elif msg.type == WSMsgType.BINARY:
                        await bot.send_bytes(msg.data)
                relay.cancel()
        self.live.pop(sid, None)
        self.end_session(session, "completed")
        return ws


async def serve() -> None:
    listen = os.environ.get("BROKER__LISTEN", "127.0.0.1:8080")
    internal = os.environ.get("BROKER__INTERNAL_LISTEN", "127.0.0.1:9090")
    broker = Broker(
        os.environ.get("BROKER__REGION", "us-west"),
        os.environ.get("BROKER__BOTS__URL_TEMPLATE", "ws://127.0.0.1:7860/ws"),
    )
    app = web.Application()
    r = app.router
    v1 = "/v1/organizations"
    r.add_get(v1, broker.organizations)
    r.add_get(v1 + "/{org}/regions", broker.regions)
    r.add_get(v1 + "/{org}/properties", broker.properties)
    r.add_route("*", v1 + "/{org}/services", broker.services)
    r.add_route("*", v1 + "/{org}/services/{agent}", broker.service)
    r.add_get(v1 + "/{org}/services/{agent}/sessions", broker.sessions_list)
    r.add_route("*", v1 + "/{org}/services/{agent}/sessions/{id}", broker.session)
    r.add_get(v1 + "/{org}/services/{agent}/logs", broker.logs)
    r.add_route("*", v1 + "/{org}/apiKeys", broker.api_keys)
    r.add_delete(v1 + "/{org}/apiKeys/{id}", broker.api_key)
    r.add_post("/v1/public/{agent}/start", broker.start)
    r.add_get("/ws/generic/{sh}/{token}", broker.ws)
    runner = web.AppRunner(app)
    await runner.setup()
    host, port = listen.rsplit(":", 1)
    site = web.TCPSite(runner, host, int(port))
    await site.start()
    bound = site._server.sockets[0].getsockname()  # noqa: SLF001
    ihost, iport = internal.rsplit(":", 1)
    irunner = web.AppRunner(web.Application())
    await irunner.setup()
    isite = web.TCPSite(irunner, ihost, int(iport))
    await isite.start()
    ibound = isite._server.sockets[0].getsockname()  # noqa: SLF001
    broker.ws_base = f"ws://{bound[0]}:{bound[1]}"
    _log(
        "session broker ready",
        listen=f"{bound[0]}:{bound[1]}",
        internal_listen=f"{ibound[0]}:{ibound[1]}",
        region=broker.region,
    )
    await asyncio.Event().wait()


async def echo_bot(listen: str) -> None:
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    host, port = listen.rsplit(":", 1)
    site = web.TCPSite(runner, host, int(port))
    await site.start()
    bound = site._server.sockets[0].getsockname()  # noqa: SLF001
    print(f"echo bot listening on ws://{bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    await asyncio.Event().wait()


def main(argv: list[str]) -> int:
    if argv[:2] == ["tokens", "create"]:
        org = argv[argv.index("--org") + 1]
        token = "pcc_pat_" + secrets.token_urlsafe(24)
        tokens = _load_tokens()
        tokens[hashlib.sha256(token.encode()).hexdigest()] = org
        with open(_state_file(), "w") as f:
            json.dump(tokens, f)
        print(token)
        return 0
    if argv[:1] == ["echo-bot"]:
        listen = argv[argv.index("--listen") + 1] if "--listen" in argv else "127.0.0.1:7860"
        asyncio.run(echo_bot(listen))
        return 0
    if argv[:1] in ([], ["serve"]):
        try:
            os.remove(_state_file())
        except FileNotFoundError:
            pass
        asyncio.run(serve())
        return 0
    print(f"stub_broker: unknown command {argv}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
