//! HAProxy as the peer: a plain WebSocket reverse proxy (no authentication) to the same echo
//! bot, on the same core as the broker, one thread. Installed from Debian's packages when
//! missing, as the issue that asked for it says the harness must.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct HaProxy {
    child: Child,
    pub addr: SocketAddr,
    /// Keeps the configuration file alive as long as the process.
    _config: tempfile::NamedTempFile,
}

impl HaProxy {
    /// Starts HAProxy in front of `bot`, prefixed by `prefix` (taskset); `None` when it is not
    /// installed and cannot be.
    pub fn start(prefix: &[String], bot: SocketAddr) -> Option<Self> {
        if !installed() {
            println!("installing haproxy for the peer figures (apt-get install haproxy)");
            let _ = Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends", "haproxy"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status();
            if !installed() {
                println!("SKIPPED the HAProxy peer: haproxy is not installed and cannot be");
                return None;
            }
        }
        let addr = super::free_addr();
        // Two descriptors a tunnel, within the open-file limit the harness raised.
        let maxconn = (open_file_limit().saturating_sub(200) / 2).max(100);
        let config = tempfile::NamedTempFile::new().unwrap();
        // Timeouts long enough for idle tunnels; no logging, as the broker logs at warn.
        let text = format!(
            "global\n  nbthread 1\n  maxconn {maxconn}\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 1h\n  \
             timeout server 1h\n  timeout tunnel 1h\n\
             frontend ws\n  bind {addr}\n  default_backend bot\n\
             backend bot\n  server bot {bot}\n"
        );
        std::fs::write(config.path(), text).unwrap();
        let mut argv: Vec<String> = prefix.to_vec();
        argv.extend(["haproxy", "-db", "-f"].map(String::from));
        argv.push(config.path().display().to_string());
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "haproxy did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Self { child, addr, _config: config })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn open_file_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    limit.rlim_cur
}

fn installed() -> bool {
    Command::new("haproxy").arg("-v").stdout(Stdio::null()).status().is_ok_and(|s| s.success())
}
