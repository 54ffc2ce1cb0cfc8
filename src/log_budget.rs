//! A budget for log lines that strangers can cause. A refused connect or `/start` is worth a log
//! line, but a client that floods bad tokens must not be able to flood the logs (and the disk, and
//! the log pipeline's bill) with them: past the budget, lines are counted instead, and the next
//! line that gets through says how many were left out.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

/// Refusal lines logged per second at most, per replica.
pub const REFUSAL_LINES_PER_SECOND: u32 = 20;

pub struct LogBudget {
    per_window: u32,
    window: Duration,
    /// Start of the current window and lines logged in it.
    current: Mutex<(Instant, u32)>,
    suppressed: AtomicU64,
}

impl LogBudget {
    pub fn new(per_window: u32, window: Duration) -> Self {
        Self {
            per_window,
            window,
            current: Mutex::new((Instant::now(), 0)),
            suppressed: AtomicU64::new(0),
        }
    }

    /// The budget for refusal lines.
    pub fn for_refusals() -> Self {
        Self::new(REFUSAL_LINES_PER_SECOND, Duration::from_secs(1))
    }

    /// `Some(lines left out since the last one logged)` when a line may be logged now; `None`
    /// when it must be left out (it is counted).
    pub fn take(&self) -> Option<u64> {
        let now = Instant::now();
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if now.duration_since(current.0) >= self.window {
            *current = (now, 0);
        }
        if current.1 >= self.per_window {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        current.1 += 1;
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_flood_is_counted_not_logged() {
        let budget = LogBudget::new(3, Duration::from_secs(1));
        assert_eq!((0..3).map(|_| budget.take()).collect::<Vec<_>>(), [Some(0); 3]);
        assert_eq!(budget.take(), None);
        assert_eq!(budget.take(), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(budget.take(), Some(2), "the next line says how many were left out");
        assert_eq!(budget.take(), Some(0));
    }
}
