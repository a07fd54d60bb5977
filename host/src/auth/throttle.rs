//! What slows down password guessing: the count of recent wrong passwords per client
//! address and per user name, and the wait each one imposes before the next attempt.
//!
//! Pure bookkeeping: no clock of its own (callers pass `now`), no locking, no hashing of
//! passwords. Memory is bounded: at most [`CAPACITY`] records, each a fixed size (user
//! names are kept as keyed hashes), however many names or addresses a flood brings.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Records kept at most: about 4 MiB of table.
pub const CAPACITY: usize = 65_536;

/// The first wait, once the free failures are used up; each further failure doubles it.
const FIRST_WAIT: Duration = Duration::from_secs(1);

/// How logins are limited (`conductor serve --help` documents each flag).
#[derive(Debug, Clone, Copy)]
pub struct LoginLimits {
    /// Password checks (argon2) running at once.
    pub checks: usize,
    /// How long a login waits for a free check before it is refused (503).
    pub check_wait: Duration,
    /// Wrong passwords a client address, or a user name, may send before each further
    /// attempt must wait; 0 turns the waits off.
    pub free_failures: u32,
    /// The longest wait.
    pub max_wait: Duration,
}

impl Default for LoginLimits {
    fn default() -> LoginLimits {
        LoginLimits {
            checks: 2 * std::thread::available_parallelism().map_or(1, usize::from),
            check_wait: Duration::from_secs(5),
            free_failures: 5,
            max_wait: Duration::from_secs(300),
        }
    }
}

/// Whose failures make a login wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Culprit {
    Address,
    User,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    last: Instant,
}

/// Recent wrong passwords, by client address and by user name.
pub struct Failures {
    records: HashMap<u64, Record>,
    hasher: RandomState,
    free: u32,
    max_wait: Duration,
}

impl Failures {
    pub fn new(limits: &LoginLimits) -> Failures {
        Failures {
            records: HashMap::new(),
            hasher: RandomState::new(),
            free: limits.free_failures,
            max_wait: limits.max_wait,
        }
    }

    /// Whether a login from `address` as `user` may be checked now; if not, who must
    /// wait and for how long.
    pub fn check(
        &self,
        address: Option<IpAddr>,
        user: &str,
        now: Instant,
    ) -> Result<(), (Culprit, Duration)> {
        if self.free == 0 {
            return Ok(());
        }
        let mut longest: Option<(Culprit, Duration)> = None;
        for (culprit, key) in self.keys(address, user).into_iter().flatten() {
            let Some(record) = self.records.get(&key) else {
                continue;
            };
            let until = record.last + self.wait(record.failures);
            if until > now {
                let left = until - now;
                if longest.is_none_or(|(_, longest)| left > longest) {
                    longest = Some((culprit, left));
                }
            }
        }
        longest.map_or(Ok(()), Err)
    }

    /// A wrong password from `address` for `user` (known or not: both are counted alike,
    /// so the waits do not tell which names exist).
    pub fn failed(&mut self, address: Option<IpAddr>, user: &str, now: Instant) {
        if self.free == 0 {
            return;
        }
        for (_, key) in self.keys(address, user).into_iter().flatten() {
            if !self.records.contains_key(&key) && self.records.len() >= CAPACITY {
                self.make_room(now);
            }
            let (free, max_wait) = (self.free, self.max_wait);
            let record = self.records.entry(key).or_insert(Record {
                failures: 0,
                last: now,
            });
            if forgotten(record, now, free, max_wait) {
                record.failures = 0;
            }
            record.failures = record.failures.saturating_add(1);
            record.last = now;
        }
    }

    /// A good password from `address`: the address starts afresh. The user name's
    /// count stays, or a guesser sharing the address could wipe it by logging in.
    pub fn succeeded(&mut self, address: Option<IpAddr>) {
        if let Some(address) = address {
            let key = self.address_key(address);
            self.records.remove(&key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.records.len()
    }

    /// The wait after `failures` wrong passwords.
    fn wait(&self, failures: u32) -> Duration {
        wait_after(failures, self.free, self.max_wait)
    }

    /// Frees at least a tenth of the table: forgotten records first, then those that
    /// make nobody wait yet, then the oldest. Called only when full, so its cost is
    /// shared among the many insertions that filled it.
    fn make_room(&mut self, now: Instant) {
        let target = CAPACITY - CAPACITY / 10;
        let (free, max_wait) = (self.free, self.max_wait);
        self.records
            .retain(|_, record| !forgotten(record, now, free, max_wait));
        if self.records.len() > target {
            self.records.retain(|_, record| record.failures >= free);
        }
        if self.records.len() > target {
            let mut lasts: Vec<Instant> = self.records.values().map(|r| r.last).collect();
            let cut = self.records.len() - target;
            let (_, oldest_kept, _) = lasts.select_nth_unstable(cut);
            let oldest_kept = *oldest_kept;
            self.records.retain(|_, record| record.last >= oldest_kept);
        }
    }

    /// The records a login from `address` as `user` counts against.
    fn keys(&self, address: Option<IpAddr>, user: &str) -> [Option<(Culprit, u64)>; 2] {
        [
            address.map(|address| (Culprit::Address, self.address_key(address))),
            Some((Culprit::User, self.hasher.hash_one(("user", user)))),
        ]
    }

    /// IPv6 clients are counted by their /64: one host commonly has a whole /64 to
    /// pick addresses from.
    fn address_key(&self, address: IpAddr) -> u64 {
        match address.to_canonical() {
            IpAddr::V4(v4) => self.hasher.hash_one(("v4", v4.octets())),
            IpAddr::V6(v6) => {
                let segments = v6.segments();
                self.hasher
                    .hash_one(("v6", [segments[0], segments[1], segments[2], segments[3]]))
            }
        }
    }
}

/// The wait after `failures` wrong passwords: none for the free ones, then 1 s, 2 s,
/// 4 s, … up to the longest.
fn wait_after(failures: u32, free: u32, max_wait: Duration) -> Duration {
    if failures < free {
        return Duration::ZERO;
    }
    let doublings = (failures - free).min(31);
    FIRST_WAIT
        .checked_mul(1 << doublings)
        .map_or(max_wait, |wait| wait.min(max_wait))
}

/// A record is forgotten once its wait is over and the longest wait has passed again
/// without a failure: a client that stopped guessing starts afresh.
fn forgotten(record: &Record, now: Instant, free: u32, max_wait: Duration) -> bool {
    now >= record.last + wait_after(record.failures, free, max_wait) + max_wait
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(free: u32) -> LoginLimits {
        LoginLimits {
            checks: 1,
            check_wait: Duration::from_secs(1),
            free_failures: free,
            max_wait: Duration::from_secs(60),
        }
    }

    fn address(text: &str) -> Option<IpAddr> {
        text.parse().ok()
    }

    #[test]
    fn free_failures_then_waits_that_double_up_to_the_longest() {
        let mut failures = Failures::new(&limits(3));
        let start = Instant::now();
        let client = address("192.0.2.7");
        for _ in 0..3 {
            assert_eq!(failures.check(client, "admin", start), Ok(()));
            failures.failed(client, "admin", start);
        }
        // Three used up: the fourth attempt waits 1 s, then 2 s after the next failure.
        assert_eq!(
            failures.check(client, "admin", start),
            Err((Culprit::Address, Duration::from_secs(1)))
        );
        let later = start + Duration::from_secs(1);
        assert_eq!(failures.check(client, "admin", later), Ok(()));
        failures.failed(client, "admin", later);
        assert_eq!(
            failures.check(client, "admin", later),
            Err((Culprit::Address, Duration::from_secs(2)))
        );
        for _ in 0..20 {
            failures.failed(client, "admin", later);
        }
        assert_eq!(
            failures.check(client, "admin", later),
            Err((Culprit::Address, Duration::from_secs(60)))
        );
    }

    #[test]
    fn a_user_name_is_limited_across_addresses_and_an_address_across_names() {
        let mut failures = Failures::new(&limits(2));
        let now = Instant::now();
        failures.failed(address("192.0.2.1"), "admin", now);
        failures.failed(address("192.0.2.2"), "admin", now);
        // A third address guessing admin waits; so does any name from the first two
        // addresses once they have failed twice.
        assert!(matches!(
            failures.check(address("192.0.2.3"), "admin", now),
            Err((Culprit::User, _))
        ));
        failures.failed(address("192.0.2.1"), "bob", now);
        assert!(matches!(
            failures.check(address("192.0.2.1"), "carol", now),
            Err((Culprit::Address, _))
        ));
        assert_eq!(failures.check(address("192.0.2.3"), "carol", now), Ok(()));
    }

    #[test]
    fn a_good_password_clears_the_address_but_not_the_user() {
        let mut failures = Failures::new(&limits(1));
        let now = Instant::now();
        failures.failed(address("192.0.2.1"), "admin", now);
        failures.succeeded(address("192.0.2.1"));
        assert!(matches!(
            failures.check(address("192.0.2.1"), "admin", now),
            Err((Culprit::User, _))
        ));
        assert_eq!(failures.check(address("192.0.2.1"), "bob", now), Ok(()));
    }

    #[test]
    fn one_ipv6_host_is_one_address_and_v4_mapped_is_v4() {
        let mut failures = Failures::new(&limits(1));
        let now = Instant::now();
        failures.failed(address("2001:db8:1:2::1"), "a", now);
        assert!(matches!(
            failures.check(address("2001:db8:1:2:ffff::9"), "b", now),
            Err((Culprit::Address, _))
        ));
        assert_eq!(failures.check(address("2001:db8:1:3::1"), "b", now), Ok(()));
        failures.failed(address("192.0.2.9"), "c", now);
        assert!(matches!(
            failures.check(address("::ffff:192.0.2.9"), "d", now),
            Err((Culprit::Address, _))
        ));
    }

    #[test]
    fn records_are_forgotten_after_the_waits_and_zero_turns_limits_off() {
        let mut failures = Failures::new(&limits(1));
        let now = Instant::now();
        failures.failed(address("192.0.2.1"), "admin", now);
        failures.failed(address("192.0.2.1"), "admin", now);
        // Two failures: 2 s to wait; after that and the longest wait (60 s), a fresh start.
        let much_later = now + Duration::from_secs(62);
        failures.failed(address("192.0.2.1"), "admin", much_later);
        assert_eq!(
            failures.check(address("192.0.2.1"), "admin", much_later),
            Err((Culprit::Address, Duration::from_secs(1)))
        );

        let mut off = Failures::new(&limits(0));
        for _ in 0..100 {
            off.failed(address("192.0.2.1"), "admin", now);
        }
        assert_eq!(off.check(address("192.0.2.1"), "admin", now), Ok(()));
        assert_eq!(off.len(), 0);
    }

    #[test]
    fn a_flood_of_names_and_addresses_stays_within_capacity_and_keeps_the_guilty() {
        let mut failures = Failures::new(&limits(3));
        let now = Instant::now();
        // A guesser who has earned a wait...
        for _ in 0..5 {
            failures.failed(address("198.51.100.1"), "admin", now);
        }
        // ...then a flood of distinct names from distinct addresses, one failure each.
        for i in 0..(CAPACITY as u32 * 2) {
            let [a, b, c, d] = i.to_be_bytes();
            let from = IpAddr::from([10 ^ a, b, c, d]);
            failures.failed(
                Some(from),
                &format!("user{i}"),
                now + Duration::from_millis(1),
            );
        }
        assert!(failures.len() <= CAPACITY, "{}", failures.len());
        assert!(matches!(
            failures.check(address("198.51.100.1"), "bob", now),
            Err((Culprit::Address, _))
        ));
        assert!(matches!(
            failures.check(address("203.0.113.5"), "admin", now),
            Err((Culprit::User, _))
        ));
    }
}
