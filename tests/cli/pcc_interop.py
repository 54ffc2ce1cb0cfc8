#!/usr/bin/env python3
"""Interoperability test: the real `pipecat cloud` CLI against a real session broker.

    python3 tests/cli/pcc_interop.py [BROKER_BINARY]     (default: target/release/session-broker)

What it does, in order (docs/pcc-cli-api.md says why each expectation holds):
  1. makes or reuses a venv with the pinned CLI (env PCC_VENV, default target/pcc-venv) and
     re-runs itself inside it (for `websockets` and `aiohttp`);
  2. starts redis-server on a free port, `BROKER echo-bot`, and `BROKER` itself (ports 0, learnt
     from the JSON log line "session broker ready"), then `BROKER tokens create --org acme`;
  3. drives `pipecat cloud …` with no terminal (stdin is /dev/null) through organizations list,
     deploy (create, then update), agent list/status, keys create/list, agent start (with and
     without a body), a WebSocket session relayed to the echo bot, agent sessions, agent stop
     (the broker closes the WebSocket with 4000), the end-state filter, agent logs, keys revoke
     (its prompt answered through a pseudo-terminal), agent delete, and wrong or missing tokens.

It stops at the first failure with what the CLI printed and the broker's last log lines, and its
last line is `N passed, M failed`. BROKER may also be a `.py` stand-in (tests/cli/stub_broker.py),
run with the venv's Python, to check this script itself.
"""

import base64
import contextlib
import json
import os
import pty
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
REQUIREMENTS = HERE / "requirements.txt"
REEXEC_FLAG = "PCC_INTEROP_IN_VENV"

ORG = "acme"
OTHER_ORG = "other"
AGENT = "interop-bot"
IMAGE = "example/interop-bot:1.0"
MAX_SESSION_DURATION = 600
MAX_AGENTS = 5

# Exactly what Pipecat Cloud accepts: nothing of the broker's own.
DEPLOY_TOML = f"""\
agent_name = "{AGENT}"
image = "{IMAGE}"
websocket_auth = "token"
region = "us-west"
max_session_duration = {MAX_SESSION_DURATION}

[scaling]
min_agents = 0
max_agents = {MAX_AGENTS}
"""

CLI_TIMEOUT = 60  # seconds for one CLI command; deploy's own poll budget is 10 minutes
STARTUP_TIMEOUT = 20


# ---------------------------------------------------------------------------------------------
# The venv


def venv_dir() -> Path:
    path = Path(os.environ.get("PCC_VENV", "target/pcc-venv"))
    return path if path.is_absolute() else REPO / path


def pinned() -> dict[str, str]:
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"\[.*\]", "", name).strip()] = version.strip()
    return pins


def venv_matches(python: Path) -> bool:
    if not python.exists():
        return False
    probe = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except Exception: out[n] = None\n"
        "print(json.dumps(out))\n"
    )
    pins = pinned()
    try:
        got = subprocess.run(
            [str(python), "-c", probe, *pins], capture_output=True, text=True, timeout=60
        )
        versions = json.loads(got.stdout)
    except Exception:
        return False
    return all(versions.get(n) == v for n, v in pins.items()) and (
        python.parent / "pipecat"
    ).exists()


def ensure_venv() -> Path:
    venv = venv_dir()
    python = venv / "bin" / "python"
    if venv_matches(python):
        return venv
    print(f"setting up {venv} with {REQUIREMENTS.name} …", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
         str(REQUIREMENTS)],
        check=True,
    )
    if not venv_matches(python):
        sys.exit(f"FAIL: {venv} does not hold the pinned packages after pip install")
    return venv


# ---------------------------------------------------------------------------------------------
# Reporting


class Failure(Exception):
    pass


PASSED = 0


def ok(name: str) -> None:
    global PASSED
    PASSED += 1
    print(f"ok   {name}", flush=True)


def fail(name: str, detail: str) -> None:
    raise Failure(f"{name}\n{detail}")


# ---------------------------------------------------------------------------------------------
# Processes


class Proc:
    """A child process whose output is read on threads into memory (and kept for failures)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        self.name = name
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.popen = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True,
        )
        for stream in (self.popen.stdout, self.popen.stderr):
            threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def wait_for(self, predicate, what: str, timeout: float = STARTUP_TIMEOUT):
        """The first line (parsed by predicate, which returns a value or None) that matches."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                while seen < len(self.lines):
                    value = predicate(self.lines[seen])
                    seen += 1
                    if value is not None:
                        return value
                if self.popen.poll() is not None:
                    fail(f"{self.name} started", f"it exited ({self.popen.returncode}) before "
                         f"{what}\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    fail(f"{self.name} started", f"no {what} within {timeout}s\n{self.tail()}")
                self.cond.wait(min(left, 0.2))

    def tail(self, n: int = 40) -> str:
        with self.cond:
            lines = self.lines[-n:]
        return "\n".join(f"  [{self.name}] {line}" for line in lines) or f"  [{self.name}] (no output)"

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# The CLI


class Cli:
    def __init__(self, venv: Path, workdir: Path, api_host: str, token: str):
        self.pipecat = str(venv / "bin" / "pipecat")
        self.workdir = workdir
        self.base_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(workdir / "home"),
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
            "TERM": "dumb",
            "COLUMNS": "200",
            "NO_COLOR": "1",
            "PIPECAT_API_HOST": api_host,
            "PIPECAT_TOKEN": token,
            "PIPECAT_ORG": ORG,
            "PIPECAT_CONFIG_PATH": str(workdir / "config" / "pipecatcloud.toml"),
        }

    def env(self, **changes: str | None) -> dict[str, str]:
        env = dict(self.base_env)
        for key, value in changes.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def run(self, *args: str, output: str = "plain", env: dict | None = None):
        """Runs `pipecat cloud --output OUTPUT ARGS…` with no terminal; (rc, stdout, stderr, s)."""
        argv = [self.pipecat, "cloud", "--output", output, *args]
        started = time.monotonic()
        try:
            done = subprocess.run(
                argv, env=env or self.env(), cwd=self.workdir, stdin=subprocess.DEVNULL,
                capture_output=True, text=True, errors="replace", timeout=CLI_TIMEOUT,
            )
        except subprocess.TimeoutExpired as e:
            fail(" ".join(args), f"`pipecat cloud {' '.join(args)}` still running after "
                 f"{CLI_TIMEOUT}s\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")
        return done.returncode, done.stdout, done.stderr, time.monotonic() - started

    def expect(self, name: str, *args: str, rc: int = 0, output: str = "plain",
               contains: tuple[str, ...] = (), absent: tuple[str, ...] = (),
               env: dict | None = None):
        """Runs the CLI and checks its exit code and what it printed (stdout and stderr)."""
        code, out, err, elapsed = self.run(*args, output=output, env=env)
        both = out + err
        shown = (f"command: pipecat cloud --output {output} {' '.join(args)}\n"
                 f"exit code: {code}\n--- stdout\n{out}--- stderr\n{err}---")
        if code != rc:
            fail(name, f"exit code {code}, expected {rc}\n{shown}")
        for text in contains:
            if text not in both:
                fail(name, f"output lacks {text!r}\n{shown}")
        for text in absent:
            if text in both:
                fail(name, f"output has {text!r}\n{shown}")
        return out, err, elapsed, shown

    def expect_json(self, name: str, *args: str, rc: int = 0, env: dict | None = None):
        out, err, elapsed, shown = self.expect(name, *args, rc=rc, output="json", env=env)
        try:
            return json.loads(out), shown
        except ValueError:
            fail(name, f"stdout is not one JSON document\n{shown}")

    def run_with_terminal(self, args: list[str], answers: list[tuple[str, bytes]],
                          timeout: float = CLI_TIMEOUT):
        """Runs the CLI on a pseudo-terminal, writing each answer once its prompt text shows."""
        argv = [self.pipecat, "cloud", "--output", "plain", *args]
        env = self.env(TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1", LINES="40")
        pid, fd = pty.fork()
        if pid == 0:  # the child
            try:
                os.chdir(self.workdir)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        import fcntl
        import termios
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
        buffer = b""
        pending = list(answers)
        deadline = time.monotonic() + timeout
        status = None
        try:
            while True:
                if pending and pending[0][0].encode() in strip_ansi(buffer):
                    os.write(fd, pending.pop(0)[1])
                left = deadline - time.monotonic()
                if left <= 0:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    fail(" ".join(args), "still running on the terminal after "
                         f"{timeout}s; screen so far:\n{strip_ansi(buffer).decode(errors='replace')}")
                ready, _, _ = select.select([fd], [], [], min(left, 0.2))
                if ready:
                    try:
                        chunk = os.read(fd, 65536)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        break
                    buffer += chunk
        finally:
            _, status = os.waitpid(pid, 0)
            os.close(fd)
        return os.waitstatus_to_exitcode(status), strip_ansi(buffer).decode(errors="replace")


def strip_ansi(data: bytes) -> bytes:
    return re.sub(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]|\r", b"", data)


def rows(out: str) -> list[list[str]]:
    return [line.split("\t") for line in out.splitlines() if "\t" in line]


# ---------------------------------------------------------------------------------------------
# The scenario


def broker_command(binary: str, venv: Path) -> list[str]:
    if binary.endswith(".py"):
        return [str(venv / "bin" / "python"), binary]
    return [binary]


def main() -> int:
    binary = sys.argv[1] if len(sys.argv) > 1 else str(REPO / "target/release/session-broker")
    binary = str(Path(binary).resolve())
    if not Path(binary).exists():
        print(f"FAIL: no broker binary at {binary} (build it: cargo build --release)")
        print("0 passed, 1 failed")
        return 1
    if not shutil.which("redis-server"):
        print("FAIL: redis-server is not on PATH")
        print("0 passed, 1 failed")
        return 1

    venv = venv_dir()
    broker = broker_command(binary, venv)
    workdir = Path(tempfile.mkdtemp(prefix="pcc-interop-"))
    procs: list[Proc] = []
    broker_proc: Proc | None = None
    try:
        (workdir / "home").mkdir()
        (workdir / "pcc-deploy.toml").write_text(DEPLOY_TOML)

        # Redis, the echo bot, the broker.
        redis_port = free_port()
        redis = Proc("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no"], dict(os.environ))
        procs.append(redis)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not redis_answers(redis_port):
            if redis.popen.poll() is not None or time.monotonic() > deadline:
                fail("redis-server started", redis.tail())
            time.sleep(0.05)

        bot = Proc("echo-bot", [*broker, "echo-bot", "--listen", "127.0.0.1:0"], dict(os.environ))
        procs.append(bot)

        def bot_address(line: str):
            found = re.search(r"listening on ws://(\S+)", line)
            return found.group(1) if found else None

        bot_addr = bot.wait_for(bot_address, "'echo bot listening on ws://…' line")
        ok(f"echo bot listening on {bot_addr}")

        # Only this test's settings: a BROKER__… variable of the caller's would change the run.
        broker_env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER__")}
        broker_env.update({
            "BROKER__REDIS__URL": f"redis://127.0.0.1:{redis_port}",
            "BROKER__LISTEN": "127.0.0.1:0",
            "BROKER__INTERNAL_LISTEN": "127.0.0.1:0",
            "BROKER__LOG__FORMAT": "json",
            "BROKER__TOKEN__SIGNING_KEY_ID": "k1",
            "BROKER__TOKEN__KEYS__K1": secrets.token_urlsafe(32),
            "BROKER__REGION": "us-west",
            "BROKER__BOTS__URL_TEMPLATE": f"ws://{bot_addr}/ws",
        })
        broker_proc = Proc("broker", broker, broker_env)
        procs.append(broker_proc)

        def ready_line(line: str):
            try:
                record = json.loads(line)
            except ValueError:
                return None
            fields = record.get("fields", record) if isinstance(record, dict) else {}
            if fields.get("message") == "session broker ready":
                return fields
            return None

        ready = broker_proc.wait_for(ready_line, "'session broker ready' JSON log line")
        listen = ready.get("listen")
        if not listen or not ready.get("internal_listen"):
            fail("broker ready line", f"no listen/internal_listen in {ready}")
        api_host = f"http://{listen}"
        ok(f"broker ready on {listen}")

        def mint_token(org: str) -> str:
            done = subprocess.run([*broker, "tokens", "create", "--org", org], env=broker_env,
                                  capture_output=True, text=True, timeout=30)
            lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
            if done.returncode != 0 or not lines:
                fail(f"tokens create --org {org}", f"exit {done.returncode}\nstdout:\n"
                     f"{done.stdout}\nstderr:\n{done.stderr}")
            return lines[-1]

        token = mint_token(ORG)
        other_token = mint_token(OTHER_ORG)
        ok("session-broker tokens create --org acme printed a private token")

        cli = Cli(venv, workdir, api_host, token)
        scenario(cli, token, other_token, broker_proc)
    except Failure as failure:
        print(f"FAIL: {failure}", flush=True)
        if broker_proc is not None and "[broker]" not in str(failure):
            print("broker's last log lines:")
            print(broker_proc.tail())
        print(f"{PASSED} passed, 1 failed")
        return 1
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{PASSED} passed, 0 failed")
    return 0


def scenario(cli: Cli, token: str, other_token: str, broker: Proc) -> None:
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    # ---- organizations list: the org comes from GET /v1/organizations when PIPECAT_ORG is unset
    _, _, baseline, shown = cli.expect(
        "organizations list (org resolved from the token)", "organizations", "list",
        env=cli.env(PIPECAT_ORG=None))
    if not any(len(r) >= 3 and r[1] == ORG and r[2] == "active" for r in rows(shown)):
        fail("organizations list", f"no row '<verboseName>\\tacme\\tactive'\n{shown}")
    ok("organizations list: acme, active")
    data, shown = cli.expect_json("organizations list --output json", "organizations", "list",
                                  env=cli.env(PIPECAT_ORG=None))
    orgs = data.get("organizations") if isinstance(data, dict) else None
    if not orgs or orgs[0].get("name") != ORG or "verboseName" not in orgs[0]:
        fail("organizations list --output json", f"expected organizations[0].name == acme\n{shown}")
    ok("organizations list --output json: [{name: acme, verboseName}]")

    # ---- wrong, missing and foreign tokens
    cli.expect("a wrong token: the CLI's 401 'log in again'", "agent", "list", rc=1,
               contains=("Unauthorized (401)", "auth login"), env=cli.env(PIPECAT_TOKEN="bogus"))
    ok("wrong token: agent list exits 1 with 'Unauthorized (401) … auth login'")
    data, shown = cli.expect_json("a wrong token, --output json", "agent", "list", rc=1,
                                  env=cli.env(PIPECAT_TOKEN="bogus"))
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or error.get("code") != "401" or not error.get("error"):
        fail("401 body", f"expected {{'error': {{'code': '401', 'error': '…'}}}}\n{shown}")
    ok("wrong token: the 401 body is JSON with code '401' and error")
    cli.expect("a wrong token without PIPECAT_ORG", "organizations", "list", rc=1,
               contains=("Could not determine your organization",),
               env=cli.env(PIPECAT_TOKEN="bogus", PIPECAT_ORG=None))
    ok("wrong token, no PIPECAT_ORG: 'Could not determine your organization', exit 1")
    cli.expect("no token at all", "agent", "list", rc=1, contains=("You are not logged in",),
               env=cli.env(PIPECAT_TOKEN=None))
    ok("no token: 'You are not logged in', exit 1")
    data, shown = cli.expect_json("a token of another org", "agent", "list", rc=1,
                                  env=cli.env(PIPECAT_TOKEN=other_token))
    if (data.get("error") or {}).get("code") != "403":
        fail("a token of another org", f"expected an error with code '403'\n{shown}")
    ok("another org's token: 403, exit 1")

    # ---- deploy: create (POST), then update (PUT); the first status poll must already be ready
    out, err, elapsed, shown = cli.expect(
        "deploy (create)", "deploy", "--yes",
        contains=("Pushing agent manifest for 'interop-bot'", "Deployment complete",
                  "Agent deployment 'interop-bot' is ready", "WebSocket auth: token",
                  "Max agents: 5"),
        absent=("Waiting for operator", "transient API error"))
    if elapsed > baseline + 4.0:
        fail("deploy (create)", f"took {elapsed:.1f}s against {baseline:.1f}s for a plain call: "
             "the first GET …/services/interop-bot did not answer ready, so the CLI slept 5 s\n"
             + shown)
    ok(f"deploy created the agent, ready on the first poll ({elapsed:.1f}s)")
    data, shown = cli.expect_json("deploy (update)", "deploy", "--yes")
    if data != {"agentName": AGENT, "deploymentId": data.get("deploymentId"), "ready": True,
                "available": True}:
        fail("deploy (update)", f"expected ready and available\n{shown}")
    if "Update complete" not in shown or "Updating agent manifest" not in shown:
        fail("deploy (update)", f"the second deploy was not an update (PUT)\n{shown}")
    ok("deploy again updated it (PUT), ready")

    # ---- agent list and status
    _, _, _, shown = cli.expect("agent list", "agent", "list",
                                contains=("Agents for organization: acme (1 results)",))
    row = next((r for r in rows(shown) if r[0] == AGENT), None)
    if not row or len(row) < 6 or row[1] != "us-west" or not row[2] or not row[4] or not row[5]:
        fail("agent list", f"expected a row interop-bot, us-west, id, deployment, dates\n{shown}")
    ok("agent list: interop-bot in us-west")
    cli.expect("agent status", "agent", "status", AGENT,
               contains=("Ready: True", f"Image: {IMAGE}",
                         f"Max Session Duration: {MAX_SESSION_DURATION}s",
                         f"Max Agents: {MAX_AGENTS}", "Min Agents: 0"))
    ok("agent status (plain): ready, image, max session duration, scaling")
    cli.expect("agent status (rich)", "agent", "status", AGENT, output="rich",
               contains=("Health: Ready", IMAGE, "Maximum Agents"))
    ok("agent status (rich) renders: autoScaling and ready are present")
    data, shown = cli.expect_json("agent status --output json", "agent", "status", AGENT)
    spec = (((data.get("deployment") or {}).get("manifest") or {}).get("spec") or {})
    if (data.get("ready") is not True or spec.get("image") != IMAGE
            or spec.get("maxSessionDurationSeconds") != MAX_SESSION_DURATION
            or (data.get("autoScaling") or {}).get("maxReplicas") != MAX_AGENTS):
        fail("agent status --output json", f"ready/spec/autoScaling wrong\n{shown}")
    ok("agent status --output json: body.ready, deployment.manifest.spec, autoScaling")
    cli.expect("status of an unknown agent", "agent", "status", "no-such-agent", rc=1,
               contains=("No deployment data found",))
    ok("agent status of an unknown agent: 404 → 'No deployment data found', exit 1")
    data, shown = cli.expect_json("sessions of an unknown agent", "agent", "sessions",
                                  "no-such-agent", rc=1)
    if (data.get("error") or {}).get("code") != "404":
        fail("sessions of an unknown agent", f"expected a JSON error with code '404'\n{shown}")
    ok("agent sessions of an unknown agent: JSON 404, exit 1")

    # ---- public keys
    key, shown = cli.expect_json("keys create spare", "organizations", "keys", "create",
                                 "--name", "spare")
    if not str(key.get("key", "")).startswith("pk_"):
        fail("keys create", f"no pk_ key in the answer\n{shown}")
    key, shown = cli.expect_json("keys create", "organizations", "keys", "create",
                                 "--name", "interop")
    public_key = str(key.get("key", ""))
    if not public_key.startswith("pk_"):
        fail("keys create", f"no pk_ key in the answer\n{shown}")
    ok("organizations keys create: answered a pk_ key")
    _, _, _, shown = cli.expect("keys list", "organizations", "keys", "list",
                                contains=("Name\tKey\tCreated At\tStatus",))
    if not any(r[0] == "interop" and r[3] == "Active" for r in rows(shown) if len(r) == 4):
        fail("keys list", f"no active key named interop\n{shown}")
    ok("organizations keys list: interop, Active")

    # ---- agent start with the public key
    _, _, _, shown = cli.expect("agent start", "agent", "start", AGENT, "--api-key", public_key,
                                "--force", contains=("Agent 'interop-bot' started successfully",
                                                     "Session ID: "))
    plain_session = re.search(r"Session ID: (\S+)", shown).group(1)
    ok("agent start (plain): 'started successfully' and the session id")
    start, shown = cli.expect_json("agent start --output json", "agent", "start", AGENT,
                                   "--api-key", public_key, "--force")
    for field in ("token", "wsUrl", "sessionId"):
        if not isinstance(start.get(field), str) or not start[field]:
            fail("agent start --output json", f"no {field}\n{shown}")
    if "body" in start:
        fail("agent start --output json", f"'body' answered though none was sent\n{shown}")
    try:
        uuid.UUID(start["sessionId"])
    except ValueError:
        fail("agent start --output json", f"sessionId is not a UUID\n{shown}")
    if not start["wsUrl"].endswith(f"/ws/generic/{AGENT}.{ORG}"):
        fail("agent start --output json", f"wsUrl is not …/ws/generic/{AGENT}.{ORG}\n{shown}")
    ok("agent start --output json: token, wsUrl …/ws/generic/interop-bot.acme, sessionId")
    sent = '{"hello": "world", "n": 1.50}'
    with_body, shown = cli.expect_json("agent start --data", "agent", "start", AGENT,
                                       "--api-key", public_key, "--force", "--data", sent)
    # The CLI parses --data and aiohttp re-serializes it with json.dumps: these are the bytes
    # of `body` in the request, which /start must answer verbatim in base64.
    expected = json.dumps(json.loads(sent)).encode()
    try:
        answered = base64.b64decode(with_body.get("body", "") + "==")
    except ValueError:
        answered = b"<not base64>"
    if answered != expected:
        fail("agent start --data", f"body decodes to {answered!r}, expected {expected!r}\n{shown}")
    ok("agent start --data: body is base64 of the exact JSON sent")
    cli.expect("agent start with the default key from the environment", "agent", "start", AGENT,
               "--force", contains=("started successfully",),
               env=cli.env(PIPECAT_DEFAULT_PUBLIC_KEY=public_key))
    ok("agent start with PIPECAT_DEFAULT_PUBLIC_KEY instead of --api-key")
    cli.expect("agent start with a private token as public key", "agent", "start", AGENT,
               "--api-key", token, "--force", rc=1, contains=("Unauthorized (401)",))
    ok("agent start with a non-public key: 401, exit 1")

    # ---- the WebSocket: token as the last path segment, echoed by the bot
    session_id = start["sessionId"]
    url = f"{start['wsUrl']}/{start['token']}"
    with contextlib.ExitStack() as stack:
        try:
            ws = stack.enter_context(connect(url, open_timeout=10, close_timeout=5))
        except Exception as e:  # noqa: BLE001
            fail("WebSocket connect", f"{url}: {e!r}")
        ws.send("hello interop")
        try:
            echoed = ws.recv(timeout=10)
        except Exception as e:  # noqa: BLE001
            fail("WebSocket echo", f"no echo: {e!r}")
        if echoed != "hello interop":
            fail("WebSocket echo", f"got {echoed!r}")
        ok("WebSocket with the token as last path segment: message echoed by the bot")
        try:
            with connect(url, open_timeout=10):
                pass
            fail("token reuse", "a second connect with the same token was accepted")
        except InvalidStatus as e:
            if e.response.status_code != 403:
                fail("token reuse", f"answered {e.response.status_code}, expected 403")
        ok("the token is one-time: a second connect gets 403")

        # ---- agent sessions shows it active
        data, shown = cli.expect_json("agent sessions --output json", "agent", "sessions", AGENT)
        listed = {s.get("sessionId"): s for s in data.get("sessions", [])}
        mine = listed.get(session_id)
        if not mine:
            fail("agent sessions", f"session {session_id} not listed\n{shown}")
        if mine.get("endState") != "active" or mine.get("endedAt") is not None:
            fail("agent sessions", f"session {session_id} is not active (endState 'active', "
                 f"endedAt null)\n{shown}")
        for field in ("createdAt", "endedAt", "botStartSeconds", "coldStart"):
            if field not in mine:
                fail("agent sessions", f"session lacks {field!r} (the CLI's table reads it)\n{shown}")
        _, _, _, shown = cli.expect("agent sessions", "agent", "sessions", AGENT,
                                    contains=("Session ID\tCreated At\tEnded At",))
        if not any(r[0] == session_id and r[4] == "Active" for r in rows(shown) if len(r) >= 5):
            fail("agent sessions", f"no Active row for {session_id}\n{shown}")
        ok("agent sessions: the connected session is Active")

        # ---- agent stop ends it: the broker closes the WebSocket with 4000
        cli.expect("agent stop", "agent", "stop", AGENT, "--session-id", session_id, "--force",
                   contains=(f"Session '{session_id}' stopped successfully",))
        ok("agent stop: 'stopped successfully', exit 0")
        try:
            message = ws.recv(timeout=10)
            fail("WebSocket after agent stop", f"still open; received {message!r}")
        except TimeoutError:
            fail("WebSocket after agent stop", "still open 10 s after agent stop")
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd else None
            if code != 4000:
                fail("WebSocket after agent stop", f"closed with {code}, expected 4000 ({e!r})")
        ok("agent stop terminated the session: WebSocket closed with 4000")

    # ---- the end-state filter
    _, _, _, shown = cli.expect("agent sessions --end-state terminated", "agent", "sessions",
                                AGENT, "--end-state", "terminated")
    if not any(r[0] == session_id and r[4] == "Terminated" and r[2]
               for r in rows(shown) if len(r) >= 5):
        fail("--end-state terminated", f"no Terminated row with Ended At for {session_id}\n{shown}")
    if any(r[0] == plain_session for r in rows(shown)):
        fail("--end-state terminated", f"lists {plain_session}, which was never stopped\n{shown}")
    ok("agent sessions --end-state terminated: the stopped session, and only ended ones")
    data, shown = cli.expect_json("agent sessions --end-state active", "agent", "sessions",
                                  AGENT, "--end-state", "active")
    ids = {s.get("sessionId") for s in data.get("sessions", [])}
    if session_id in ids or any(s.get("endState") != "active" for s in data.get("sessions", [])):
        fail("--end-state active", f"lists a session that is not active\n{shown}")
    ok("agent sessions --end-state active: not the stopped session")
    cli.expect("agent sessions --id", "agent", "sessions", AGENT, "--id", session_id,
               contains=(f"Session ID: {session_id}", "Terminated"))
    ok("agent sessions --id: the one session, Terminated")

    # ---- agent logs: started, connected and ended events of that session
    data, shown = cli.expect_json("agent logs --session-id", "agent", "logs", AGENT,
                                  "--session-id", session_id)
    logs = data.get("logs") if isinstance(data, dict) else None
    if not logs or not all(isinstance(e.get("log"), str) and isinstance(e.get("timestamp"), str)
                           for e in logs):
        fail("agent logs", f"expected logs: [{{timestamp, log}}, …]\n{shown}")
    text = "\n".join(e["log"] for e in logs).lower()
    for word in ("started", "connected", "ended"):
        if word not in text:
            fail("agent logs", f"no '{word}' event for the session\n{shown}")
    if any(plain_session in e["log"] for e in logs):
        fail("agent logs --session-id", f"lists another session's events\n{shown}")
    ok("agent logs --session-id: started, connected and ended events")
    cli.expect("agent logs", "agent", "logs", AGENT, contains=(session_id,))
    ok("agent logs (plain) lists the session's events")

    # ---- keys revoke: 1.4.0 has no `delete`; its prompt needs a terminal
    cli.expect("keys revoke without a terminal", "organizations", "keys", "revoke", rc=2,
               contains=("input is not a terminal",))
    data, shown = cli.expect_json("keys list --output json", "organizations", "keys", "list")
    active = [k for k in data.get("public", []) if not k.get("revoked")]
    index = next((i for i, k in enumerate(active) if k.get("metadata", {}).get("name") == "interop"),
                 None)
    if index is None:
        fail("keys list --output json", f"no active key named interop\n{shown}")
    down = b"\x1b[B" * index
    code, screen = cli.run_with_terminal(
        ["organizations", "keys", "revoke"], [("Select API key to revoke", down + b"\r")])
    if code != 0 or "revoked successfully" not in screen:
        fail("keys revoke", f"exit {code}\nscreen:\n{screen}")
    ok("organizations keys revoke (prompt answered on a terminal)")
    data, shown = cli.expect_json("keys list after revoke", "organizations", "keys", "list")
    states = {k.get("metadata", {}).get("name"): k.get("revoked") for k in data.get("public", [])}
    if states.get("interop") is not True or states.get("spare") is not False:
        fail("keys list after revoke", f"expected interop revoked, spare not\n{shown}")
    ok("keys list: interop revoked, spare still active")
    cli.expect("agent start with a revoked key", "agent", "start", AGENT, "--api-key",
               public_key, "--force", rc=1, contains=("Unauthorized (401)",))
    ok("agent start with the revoked key: 401, exit 1")

    # ---- agent delete
    cli.expect("agent delete", "agent", "delete", AGENT, "--force",
               contains=(f"Agent '{AGENT}' deleted successfully",))
    ok("agent delete: 'deleted successfully', exit 0")
    cli.expect("agent status after delete", "agent", "status", AGENT, rc=1,
               contains=("No deployment data found",))
    cli.expect("agent list after delete", "agent", "list", rc=1, contains=("No agents found",))
    cli.expect("agent delete again", "agent", "delete", AGENT, "--force", rc=1,
               contains=("not found",))
    ok("after delete: status and list find nothing, a second delete says not found")

    if broker.popen.poll() is not None:
        fail("broker still running", f"it exited ({broker.popen.returncode})\n{broker.tail()}")
    ok("broker still running at the end")


def reexec_in_venv() -> None:
    venv = ensure_venv()
    python = venv / "bin" / "python"
    if os.environ.get(REEXEC_FLAG) == "1":
        return
    env = dict(os.environ)
    env[REEXEC_FLAG] = "1"
    os.execve(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]], env)


if __name__ == "__main__":
    if os.environ.get(REEXEC_FLAG) != "1":
        reexec_in_venv()
    sys.exit(main())
