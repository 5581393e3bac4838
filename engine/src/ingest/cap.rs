//! Limits on the keys a view may create: the view's `max_keys`, and a budget of
//! state memory shared by every view (and every engine) of a process.
//!
//! Each new key can cost its full pane state (ring positions are allocated for every
//! key as the stream reaches their panes), so keys are what a hostile or runaway
//! producer can exhaust memory with; the budget charges a key that bound. A row whose
//! key is new is refused (and counted as
//! [`RejectReason::KeyLimit`](super::RejectReason::KeyLimit)) when the view holds its
//! `max_keys` or when the budget cannot pay for the key; rows of known keys are always
//! taken.
//!
//! New string values (see [`super::strings`]) are charged too: a view's string table
//! lives in both replicas, so each new string costs the budget its bytes and its
//! table entry twice ([`string_charge`]). A row whose new strings the budget cannot
//! pay for is refused like a row with a new key, and its key is not created.
//!
//! A refusal is *sticky* for the rest of a push: once one new key is refused, every
//! later new key of the same push is too. The keys a push creates are then the first
//! `n` new keys in row order, whatever other views do to the budget meanwhile, and the
//! second replica of a view replays the push with a plain cap of the first replica's
//! key count to make the very same decisions.

use std::sync::atomic::{AtomicU64, Ordering};

/// A budget of state memory, charged per key by every view that shares it.
///
/// The charge of a key is an estimate: its pane state in every copy the engine keeps
/// (two replicas, each with its read copy when enabled), as
/// `CompiledView::bytes_per_key` counts it.
#[derive(Debug)]
pub struct StateBudget {
    limit: u64,
    used: AtomicU64,
}

impl StateBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        StateBudget {
            limit,
            used: AtomicU64::new(0),
        }
    }

    /// The budget, bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes charged so far.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Charges `bytes` if they fit.
    fn try_charge(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(bytes).filter(|&n| n <= self.limit)
            })
            .is_ok()
    }

    /// Charges `bytes` whether they fit or not (state restored from a checkpoint
    /// exists already; refusing it would lose it).
    pub(crate) fn charge(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Gives back `bytes` charged before.
    pub(crate) fn release(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(bytes))
            });
    }
}

/// The memory this process may use, bytes: the least of the machine's memory, the
/// cgroup's `memory.max` and the address-space limit (`RLIMIT_AS`), where each is known
/// (Linux; `None` elsewhere or when none is).
pub fn memory_limit() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let total = read("/proc/meminfo").and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    });
    let cgroup = read("/sys/fs/cgroup/memory.max").and_then(|s| s.trim().parse::<u64>().ok());
    let address_space = read("/proc/self/limits").and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("Max address space"))?;
        line.split_whitespace().nth(3)?.parse::<u64>().ok()
    });
    [total, cgroup, address_space].into_iter().flatten().min()
}

/// What one push may create: at most `max_keys` keys in the view, each paid for by
/// the budget when there is one.
#[derive(Debug)]
pub(crate) struct KeyCap<'a> {
    max_keys: usize,
    budget: Option<(&'a StateBudget, u64)>,
    refused: bool,
    strings_refused: bool,
    /// Keys charged to the budget by this push.
    pub charged: u64,
    /// Bytes charged to the budget for new strings by this push.
    pub charged_strings: u64,
}

/// What the strings of a view's string table cost the budget, both replicas
/// together: `bytes` of `count` strings, each with its table entry (a boxed string
/// and its index slot).
pub(crate) fn string_charge(bytes: usize, count: usize) -> u64 {
    const ENTRY: u64 = 24;
    2 * (bytes as u64 + count as u64 * ENTRY)
}

impl<'a> KeyCap<'a> {
    /// At most `max_keys` keys (`None`: no limit), no budget.
    pub fn keys(max_keys: Option<usize>) -> Self {
        KeyCap {
            max_keys: max_keys.unwrap_or(usize::MAX),
            budget: None,
            refused: false,
            strings_refused: false,
            charged: 0,
            charged_strings: 0,
        }
    }

    /// Also charges `per_key` bytes of `budget` for each new key.
    pub fn with_budget(mut self, budget: Option<&'a StateBudget>, per_key: u64) -> Self {
        self.budget = budget.map(|b| (b, per_key));
        self
    }

    /// Whether a view holding `held` keys may create one more; charges the budget if
    /// so, else says which limit refused it.
    pub fn admit(&mut self, held: usize) -> std::result::Result<(), String> {
        if held >= self.max_keys {
            self.refused = true;
            return Err(format!(
                "the view holds {held} keys, its limit (max_keys = {})",
                self.max_keys
            ));
        }
        if let Some((budget, per_key)) = self.budget {
            if self.refused || !budget.try_charge(per_key) {
                self.refused = true;
                return Err(format!(
                    "the state memory budget ({} MiB, {} MiB used) cannot pay for another key of {per_key} bytes",
                    budget.limit() >> 20,
                    budget.used() >> 20
                ));
            }
            self.charged += 1;
        }
        Ok(())
    }

    /// Charges `bytes` (from [`string_charge`]) for a row's new strings if the budget
    /// can pay, else says so; once refused, the rest of the push is.
    pub fn admit_strings(&mut self, bytes: u64) -> std::result::Result<(), String> {
        let Some((budget, _)) = self.budget else {
            return Ok(());
        };
        if self.strings_refused || !budget.try_charge(bytes) {
            self.strings_refused = true;
            return Err(format!(
                "the state memory budget ({} MiB, {} MiB used) cannot pay for {bytes} bytes of new strings",
                budget.limit() >> 20,
                budget.used() >> 20
            ));
        }
        self.charged_strings += bytes;
        Ok(())
    }

    /// Gives back `bytes` of string charges (the row was refused after all: its key
    /// could not be created).
    pub fn refund_strings(&mut self, bytes: u64) {
        if let Some((budget, _)) = self.budget {
            let bytes = bytes.min(self.charged_strings);
            budget.release(bytes);
            self.charged_strings -= bytes;
        }
    }

    /// Gives back the charge of the key last admitted (it could not be created).
    pub fn refund(&mut self) {
        if let Some((budget, per_key)) = self.budget
            && self.charged > 0
        {
            budget.release(per_key);
            self.charged -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_keys_refuses_past_the_limit() {
        let mut cap = KeyCap::keys(Some(2));
        assert!(cap.admit(0).is_ok());
        assert!(cap.admit(1).is_ok());
        let e = cap.admit(2).unwrap_err();
        assert!(e.contains("max_keys = 2"), "{e}");
    }

    #[test]
    fn budget_charges_per_key_and_refusals_stick() {
        let budget = StateBudget::new(1000);
        let mut cap = KeyCap::keys(None).with_budget(Some(&budget), 400);
        assert!(cap.admit(0).is_ok());
        assert!(cap.admit(1).is_ok());
        let e = cap.admit(2).unwrap_err();
        assert!(e.contains("state memory budget"), "{e}");
        assert_eq!((budget.used(), cap.charged), (800, 2));
        // Room appears (another view released its keys), yet this push stays refused.
        budget.release(800);
        assert!(cap.admit(2).is_err());
        cap.refund();
        assert_eq!((budget.used(), cap.charged), (0, 1));
        let mut next = KeyCap::keys(None).with_budget(Some(&budget), 400);
        assert!(next.admit(2).is_ok());
        budget.charge(10_000);
        assert_eq!(budget.used(), 10_400);
    }

    #[test]
    fn strings_are_charged_and_refunded() {
        let budget = StateBudget::new(1000);
        let mut cap = KeyCap::keys(None).with_budget(Some(&budget), 400);
        assert_eq!(string_charge(100, 2), 296);
        assert!(cap.admit_strings(296).is_ok());
        assert!(cap.admit(0).is_ok());
        let e = cap.admit_strings(400).unwrap_err();
        assert!(e.contains("400 bytes of new strings"), "{e}");
        // Refused strings stick for the push; keys are refused on their own account.
        budget.release(696);
        assert!(cap.admit_strings(1).is_err());
        budget.charge(696);
        cap.refund_strings(1000);
        assert_eq!((budget.used(), cap.charged_strings), (400, 0));
        // Without a budget nothing is charged.
        let mut free = KeyCap::keys(None);
        assert!(free.admit_strings(1 << 40).is_ok());
        assert_eq!(free.charged_strings, 0);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn memory_limit_is_known_on_linux() {
        let limit = memory_limit().expect("/proc/meminfo");
        assert!(limit > 16 << 20, "{limit}");
    }
}
