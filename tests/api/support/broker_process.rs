//! The broker binary as a process of its own, for what only a real process shows: signals, and
//! being killed without any chance to clean up.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
};

use session_broker::api_keys::hash_api_key;

use super::{
    app::{KEY, ORG, SIGNING_KEY},
    redis::free_port,
};

/// The broker binary, started with the settings of the test apps (same keys, orgs and agents).
pub struct BrokerProcess {
    pub addr: String,
    child: Child,
    /// Everything the process printed on stdout (its logs), line by line.
    pub output: Arc<Mutex<Vec<String>>>,
}

impl BrokerProcess {
    pub fn spawn(
        redis_url: &str,
        key_prefix: &str,
        agent_dir: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Self {
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_session-broker"))
            .arg("serve")
            .env_clear()
            .env("BROKER__LISTEN", format!("127.0.0.1:{port}"))
            .env("BROKER__REDIS__URL", redis_url)
            .env("BROKER__REDIS__KEY_PREFIX", key_prefix)
            .env("BROKER__TOKEN__SIGNING_KEY_ID", "k1")
            .env("BROKER__TOKEN__KEYS__K1", SIGNING_KEY)
            .env("BROKER__AGENTS__DIR", agent_dir)
            .env(format!("BROKER__ORGS__{ORG}__PUBLIC_KEY_HASHES"), hex::encode(hash_api_key(KEY)))
            .env("BROKER__WORKERS", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the broker binary runs");
        let output: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines.by_ref().map_while(Result::ok).any(|line| {
            output.lock().unwrap().push(line.clone());
            line.contains("session broker ready")
        });
        assert!(ready, "the broker process exited before it was ready");
        let sink = output.clone();
        std::thread::spawn(move || {
            lines.map_while(Result::ok).for_each(|line| sink.lock().unwrap().push(line))
        });
        Self { addr: format!("127.0.0.1:{port}"), child, output }
    }

    /// Sends SIGTERM, as an orchestrator does to stop a replica.
    pub fn terminate(&self) {
        // SAFETY: kill(2) with our own child's pid and a valid signal number.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) }, 0);
    }

    /// Waits (polling, for at most `within`) for the process to exit; returns its exit code.
    pub fn exit_code(&mut self, within: std::time::Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the broker did not exit within {within:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
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

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
