"""End-to-end checks of the local cluster (docker-compose.yml) through its load balancer:
/start and connect in each region, a token minted in one region used in the other, replay
refused, and a replica killed while sessions continue on the others and new ones start. And what
it keeps closed: the load balancer on loopback only, metrics and probes not public, Redis
refusing clients without its password."""

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import websockets

PROJECT = sys.argv[1]
WEST, EAST = "http://localhost:8080", "http://localhost:8081"
KEY = "pk_compose_demo"


def parse(raw):
    """The broker answers JSON; the load balancer, before any replica is up, its own HTML."""
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return raw.decode(errors="replace")


def http(method, url, body=None):
    req = urllib.request.Request(url, method=method, data=body)
    req.add_header("Authorization", f"Bearer {KEY}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, parse(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, parse(e.read())


def start(base):
    status, body = http("POST", f"{base}/v1/public/echo/start", b'{"transport":"websocket"}')
    assert status == 200, (status, body)
    return body


def wait_until(what, probe, within=90):
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {within}s")


async def echo(ws, text):
    await ws.send(text)
    assert await asyncio.wait_for(ws.recv(), 5) == text


async def refused_with(url, status):
    try:
        async with websockets.connect(url):
            raise AssertionError(f"{url} was accepted")
    except websockets.exceptions.InvalidStatus as e:
        assert e.response.status_code == status, e.response.status_code


def compose_container(service):
    for cmd in (["docker", "compose"], ["docker-compose"]):
        out = subprocess.run(cmd + ["-p", PROJECT, "ps", "-q", service], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    raise AssertionError(f"no container for {service}")


def inspect(container, template):
    return subprocess.run(["docker", "inspect", "-f", template, container],
                          capture_output=True, text=True, check=True).stdout.strip()


def brokers_healthy():
    """Docker's health checks (docker-compose.yml) ask each replica's /readyz on its internal
    port: all four ready means each region balances over two."""
    return all(inspect(compose_container(s), "{{.State.Health.Status}}") == "healthy"
               for s in ("west-1", "west-2", "east-1", "east-2"))


def check_closed_doors():
    ports = json.loads(inspect(compose_container("lb"), "{{json .NetworkSettings.Ports}}"))
    published = {f"{b['HostIp']}:{b['HostPort']}" for bs in ports.values() for b in bs or []}
    assert published == {"127.0.0.1:8080", "127.0.0.1:8081"}, (
        f"the load balancer is published on {published}, not loopback only (is LB_BIND set?)"
    )
    for path in ("/metrics", "/%6Detrics", "/healthz", "/readyz"):
        status, _ = http("GET", f"{WEST}{path}")
        assert status == 404, f"{path} answers {status} through the load balancer"
    # From the compose network, as any container there: the bot's has the broker's binary and
    # none of its secrets.
    out = subprocess.run(
        ["docker", "exec", compose_container("bot"), "/usr/local/bin/session-broker", "keys",
         "list", "--org", "demo", "--redis-url", "redis://redis:6379"],
        capture_output=True, text=True,
    )
    assert out.returncode != 0 and "NOAUTH" in out.stderr, (
        f"Redis without its password: exit {out.returncode}, {out.stderr.strip()}"
    )


async def main():
    wait_until("every replica healthy", brokers_healthy)
    # HAProxy's own checks (1 s apart) mark them up by now; its 503 page, not JSON, until then.
    for base in (WEST, EAST):
        wait_until(f"{base} routes to a replica", lambda: isinstance(
            http("GET", f"{base}/v1/public/echo/sessions/none")[1], dict), within=10)
    check_closed_doors()
    print("load balancer on loopback, metrics and probes not public, Redis wants its password")

    # Each region answers its own wsUrl and serves the session.
    for base, port in ((WEST, 8080), (EAST, 8081)):
        body = start(base)
        assert body["wsUrl"] == f"ws://localhost:{port}/ws/generic/echo.demo", body
        async with websockets.connect(f"{body['wsUrl']}/{body['token']}") as ws:
            await echo(ws, f"hello from {port}")
    print("each region: /start and connect ok")

    # A token minted through us-west, used through eu-central, then replayed through us-west.
    body = start(WEST)
    async with websockets.connect(f"ws://localhost:8081/ws/generic/echo.demo/{body['token']}") as ws:
        await echo(ws, "minted west, used east")
    await refused_with(f"ws://localhost:8080/ws/generic/echo.demo?token={body['token']}", 403)
    print("cross-region token ok, replay refused")

    # Six live sessions through us-west, spread over its two replicas; kill one replica.
    sessions = []
    for i in range(6):
        body = start(WEST)
        sessions.append(await websockets.connect(f"{body['wsUrl']}/{body['token']}"))
        await echo(sessions[-1], f"session {i}")
    subprocess.run(["docker", "kill", compose_container("west-1")], check=True, capture_output=True)
    alive = 0
    for ws in sessions:
        try:
            await echo(ws, "still there?")
            alive += 1
        except Exception:
            pass
    assert 0 < alive < 6, f"{alive} of 6 sessions survived the loss of one of two replicas"
    print(f"west-1 killed: {alive} of 6 sessions continue on west-2")

    async def new_session_works():
        body = start(WEST)
        async with websockets.connect(f"{body['wsUrl']}/{body['token']}") as ws:
            await echo(ws, "after the kill")

    deadline = time.time() + 30
    while True:
        try:
            await new_session_works()
            break
        except Exception:
            if time.time() > deadline:
                raise
            await asyncio.sleep(0.5)
    print("new sessions work after the kill")
    for ws in sessions:
        await ws.close()


asyncio.run(main())
