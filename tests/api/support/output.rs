//! What a child process (the broker binary, `redis-server`) prints: read line by line on a thread
//! of its own, so that the child never blocks on a full pipe, and kept so that a test can await a
//! line, await the end of the output (the process exited) or print it all when it fails.

use std::{
    io::{BufRead, BufReader, Read},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

/// One pipe's lines so far. Clones share them.
#[derive(Clone, Default)]
pub struct Output(Arc<(Mutex<Lines>, Condvar)>);

#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    /// The pipe reached its end: the process exited (it starts no children that could hold it).
    closed: bool,
    /// Reading is paused: the pipe fills up, as behind a log collector that stalls.
    stalled: bool,
}

/// Why an awaited line never came.
#[derive(Debug)]
pub enum Missing {
    /// The output ended first.
    Closed,
    TimedOut,
}

impl Output {
    /// Reads `pipe` to its end on a new thread.
    pub fn capture(pipe: impl Read + Send + 'static) -> Self {
        let output = Self::default();
        let sink = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.update(|l| l.lines.push(line));
                let mut lines = sink.lock();
                while lines.stalled {
                    lines = sink.0.1.wait(lines).unwrap_or_else(PoisonError::into_inner);
                }
            }
            sink.update(|l| l.closed = true);
        });
        output
    }

    /// The lines, even if a panic poisoned the lock: a failing test prints them, and no change
    /// to them can be left half-done (a line is pushed whole, `closed` set once).
    fn lock(&self) -> MutexGuard<'_, Lines> {
        self.0.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, change: impl FnOnce(&mut Lines)) {
        change(&mut self.lock());
        self.0.1.notify_all();
    }

    /// Blocks until a line `find` picks out has been printed, for at most `within`; returns what
    /// `find` made of it. Lines printed before the call count.
    pub fn wait_for_line<T>(
        &self,
        within: Duration,
        mut find: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, Missing> {
        let mut seen = 0;
        self.wait(within, |lines| {
            let found = lines.lines[seen..].iter().find_map(|line| find(line));
            seen = lines.lines.len();
            match found {
                Some(value) => Some(Ok(value)),
                None => lines.closed.then_some(Err(Missing::Closed)),
            }
        })
        .unwrap_or(Err(Missing::TimedOut))
    }

    /// Blocks until the output ends, for at most `within`; whether it did.
    pub fn wait_closed(&self, within: Duration) -> bool {
        self.wait(within, |lines| lines.closed.then_some(())).is_some()
    }

    /// Checks `ready` on every change until it answers, or `within` has passed.
    fn wait<T>(&self, within: Duration, mut ready: impl FnMut(&Lines) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + within;
        let mut lines = self.lock();
        loop {
            if let Some(value) = ready(&lines) {
                return Some(value);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            lines = self.0.1.wait_timeout(lines, left).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// Stops reading the pipe after the line being read, until [`Self::resume`].
    pub fn stall(&self) {
        self.update(|l| l.stalled = true);
    }

    pub fn resume(&self) {
        self.update(|l| l.stalled = false);
    }

    pub fn lines(&self) -> Vec<String> {
        self.lock().lines.clone()
    }

    /// Every line so far, for a failure message.
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }
}
