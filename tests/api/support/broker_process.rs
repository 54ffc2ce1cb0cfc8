//! The broker binary as a process of its own, for what only a real process shows: signals, and
//! being killed without any chance to clean up. It binds port 0 and the test learns the port from
//! its ready log line, so no free port is picked in advance (and raced for). Its output is kept:
//! a test can await a log line, and a failing test prints it all.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use session_broker::api_keys::hash_api_key;

use super::{
    app::TestApp,
    app::{KEY, ORG, SIGNING_KEY},
    logs,
    output::{Missing, Output},
};

/// From exec to the ready line, on a loaded machine.
const READY_WITHIN: Duration = Duration::from_secs(15);
/// Once the process is gone, for the rest of its output to be read.
const REST_OF_OUTPUT_WITHIN: Duration = Duration::from_secs(1);
/// What the broker logs once it listens; its `listen` field holds the bound address.
const READY_MESSAGE: &str = "session broker ready";

/// The broker binary with the keys, orgs and signing key of the test apps, logging JSON lines.
pub struct BrokerProcess {
    pub addr: SocketAddr,
    /// The internal listener: metrics and probes.
    pub internal: SocketAddr,
    child: Child,
    /// Its logs: one JSON object per line.
    stdout: Output,
    /// Anything else: the error it exits with, a panic.
    stderr: Output,
}

impl BrokerProcess {
    /// Starts the binary on `127.0.0.1:0` with the agents in `agent_dir`, one worker and `env`
    /// on top, and returns once it has logged that it is ready.
    pub async fn spawn(
        redis_url: &str,
        key_prefix: &str,
        agents_of: &TestApp,
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn_under(&[], redis_url, key_prefix, agents_of, env).await
    }

    /// [`BrokerProcess::spawn`], run by the command `wrapper` (which execs its last argument
    /// with the rest, as `prlimit` does), when not empty.
    pub async fn spawn_under(
        wrapper: &[&str],
        redis_url: &str,
        key_prefix: &str,
        agents_of: &TestApp,
        env: &[(&str, &str)],
    ) -> Self {
        let agent_dir = agents_of.agent_dir.path();
        let binary = env!("CARGO_BIN_EXE_session-broker");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        let mut child = command
            .args(["serve", "--listen", "127.0.0.1:0", "--internal-listen", "127.0.0.1:0"])
            .env_clear()
            // The ready line is parsed for the port.
            .env("BROKER__LOG__FORMAT", "json")
            .env("BROKER__REDIS__URL", redis_url)
            .env("BROKER__REDIS__KEY_PREFIX", key_prefix)
            .env("BROKER__TOKEN__SIGNING_KEY_ID", "k1")
            .env("BROKER__TOKEN__KEYS__K1", SIGNING_KEY)
            .env("BROKER__AGENTS__DIR", agent_dir)
            .env("BROKER__BOTS__URL_TEMPLATE", agents_of.bot.url())
            .env(format!("BROKER__ORGS__{ORG}__PUBLIC_KEY_HASHES"), hex::encode(hash_api_key(KEY)))
            .env("BROKER__WORKERS", "1")
            .env("BROKER__AGENTS__DEFAULT_MAX_AGENTS", "100000")
            .env("BROKER__LIMITS__START_RATE_PER_ADDRESS", "0")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the broker binary runs");
        let stdout = Output::capture(child.stdout.take().unwrap());
        let stderr = Output::capture(child.stderr.take().unwrap());
        // The address is not known yet; should the wait fail, dropping `broker` kills the
        // process and prints what it said.
        let unknown = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut broker = Self { addr: unknown, internal: unknown, child, stdout, stderr };
        let logs = broker.stdout.clone();
        let ready =
            tokio::task::spawn_blocking(move || logs.wait_for_line(READY_WITHIN, listen_address))
                .await
                .unwrap();
        match ready {
            Ok(Ok((addr, internal))) => (broker.addr, broker.internal) = (addr, internal),
            Ok(Err(line)) => panic!("no address in the broker's ready line: {line}"),
            Err(Missing::Closed) => panic!("the broker process exited before it was ready"),
            Err(Missing::TimedOut) => panic!("the broker process not ready in {READY_WITHIN:?}"),
        }
        broker
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM, as an orchestrator does to stop a replica.
    pub fn terminate(&self) {
        // SAFETY: kill(2) with our own child's pid and a valid signal number; the child is not
        // reaped before `wait`, so the pid is still its.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) }, 0);
    }

    /// Awaits the process's exit, for at most `within`; returns its exit code.
    pub async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        // Its output ends when it exits: the broker starts no process that could inherit it.
        let logs = self.stdout.clone();
        let exited = tokio::task::spawn_blocking(move || logs.wait_closed(within)).await.unwrap();
        assert!(exited, "the broker did not exit within {within:?}");
        self.child.wait().unwrap().code()
    }

    /// Awaits a log line containing every one of `parts`, for at most `within`. Lines logged
    /// before the call count.
    pub async fn log_line(&self, within: Duration, parts: &[&str]) -> String {
        let logs = self.stdout.clone();
        let wanted: Vec<String> = parts.iter().map(|part| part.to_string()).collect();
        let found = tokio::task::spawn_blocking(move || {
            logs.wait_for_line(within, |line| {
                wanted.iter().all(|part| line.contains(part)).then(|| line.to_owned())
            })
        });
        found.await.unwrap().unwrap_or_else(|missing| panic!("no log line {parts:?}: {missing:?}"))
    }

    /// Stops reading the process's standard output, whose pipe then fills up; see
    /// [`Output::stall`].
    pub fn stall_logs(&self) {
        self.stdout.stall();
    }

    pub fn resume_logs(&self) {
        self.stdout.resume();
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.stdout.lines()
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A URL on the internal listener (metrics and probes).
    pub fn internal_http(&self, path: &str) -> String {
        format!("http://{}{path}", self.internal)
    }

    pub fn ws_url(&self, agent: &str, org: &str) -> String {
        format!("ws://{}/ws/generic/{agent}.{org}", self.addr)
    }

    /// SIGKILL: the process gets no chance to end its sessions or release anything.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// The bound addresses in the ready line, public and internal, e.g.
/// `{"level":"INFO","listen":"127.0.0.1:40123","internal_listen":"127.0.0.1:40124",…,
/// "message":"session broker ready"}`, or the line itself if it holds none.
fn listen_address(line: &str) -> Option<Result<(SocketAddr, SocketAddr), String>> {
    let json: serde_json::Value = serde_json::from_str(line).ok()?;
    let addr = |field: &str| json[field].as_str().and_then(|addr| addr.parse().ok());
    (json["message"] == READY_MESSAGE)
        .then(|| addr("listen").zip(addr("internal_listen")).ok_or_else(|| line.to_owned()))
}

impl Drop for BrokerProcess {
    /// Kills the process; when the test is failing (or logs are asked for), prints everything
    /// it said.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() || logs::wanted() {
            self.stdout.wait_closed(REST_OF_OUTPUT_WITHIN);
            self.stderr.wait_closed(REST_OF_OUTPUT_WITHIN);
            eprintln!(
                "--- broker process {} (pid {}): stdout ---\n{}\n--- stderr ---\n{}\n---",
                self.addr,
                self.child.id(),
                self.stdout.text(),
                self.stderr.text()
            );
        }
    }
}
