//! The limits a plugin call runs under, and the `--plugin-limit` setting that changes them
//! for one provider type (`hostile:memory=64MiB,timeout=3s,fuel=1000000000`) or for all
//! (`*:timeout=10m`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Limits every call of one provider type runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory a plugin may grow to.
    pub memory_bytes: usize,
    /// Wall-clock time one call may take before it is interrupted, time spent waiting
    /// in host calls included.
    pub call_timeout: Duration,
    /// Instructions (wasmtime fuel units) one call may execute; `None` for no budget.
    pub fuel: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 256 << 20,
            call_timeout: Duration::from_secs(3600),
            fuel: None,
        }
    }
}

impl Limits {
    /// These limits with what `setting` names replaced.
    pub fn with(&self, setting: &PluginLimit) -> Limits {
        Limits {
            memory_bytes: setting.memory_bytes.unwrap_or(self.memory_bytes),
            call_timeout: setting.call_timeout.unwrap_or(self.call_timeout),
            fuel: setting.fuel.or(self.fuel),
        }
    }
}

/// The largest memory a setting may give: all a 32-bit WebAssembly memory can address.
const MAX_MEMORY: u64 = 4 << 30;
/// The smallest: less cannot hold a Rust plugin's stack and data.
const MIN_MEMORY: u64 = 1 << 20;

/// One `--plugin-limit` entry: the limits it changes for a target name, or for every
/// target when the name is `*`. Fields it does not name keep their value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginLimit {
    pub target: String,
    pub memory_bytes: Option<usize>,
    pub call_timeout: Option<Duration>,
    pub fuel: Option<u64>,
}

impl PluginLimit {
    /// Whether this entry sets the limits of every target.
    pub fn is_default(&self) -> bool {
        self.target == "*"
    }
}

/// Why a `--plugin-limit` entry was refused; the message names the fix. It leaves the
/// entry out: clap's error quotes it already.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LimitSyntaxError(String);

impl FromStr for PluginLimit {
    type Err = LimitSyntaxError;

    fn from_str(entry: &str) -> Result<PluginLimit, LimitSyntaxError> {
        let refuse = LimitSyntaxError;
        let form = "write TARGET:memory=64MiB,timeout=30s,fuel=1000000000 (any of the three)";
        let Some((target, fields)) = entry.trim().split_once(':') else {
            return Err(refuse(format!("no target name before ':'; {form}")));
        };
        let target = target.trim();
        let valid_name = !target.is_empty()
            && target
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if target != "*" && !valid_name {
            return Err(refuse(format!(
                "{target:?} is not a target name (letters, digits, '-', '_') or '*'"
            )));
        }
        let mut limit = PluginLimit {
            target: target.to_owned(),
            memory_bytes: None,
            call_timeout: None,
            fuel: None,
        };
        for field in fields.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            let Some((name, value)) = field.split_once('=') else {
                return Err(refuse(format!("{field:?} has no '='; {form}")));
            };
            let value = value.trim();
            match name.trim() {
                "memory" => {
                    let bytes = parse_bytes(value).map_err(refuse)?;
                    if !(MIN_MEMORY..=MAX_MEMORY).contains(&bytes) {
                        return Err(refuse(format!(
                            "memory must be between 1MiB and 4GiB, not {value}"
                        )));
                    }
                    limit.memory_bytes = Some(
                        usize::try_from(bytes)
                            .map_err(|_| refuse(format!("memory {value} is too large here")))?,
                    );
                }
                "timeout" => {
                    let timeout = parse_duration(value).map_err(refuse)?;
                    if timeout.is_zero() {
                        return Err(refuse("timeout must be more than zero".into()));
                    }
                    limit.call_timeout = Some(timeout);
                }
                "fuel" => {
                    let fuel: u64 = value.replace('_', "").parse().map_err(|_| {
                        refuse(format!(
                            "fuel must be a whole number of units, not {value:?}"
                        ))
                    })?;
                    if fuel == 0 {
                        return Err(refuse("fuel must be more than zero".into()));
                    }
                    limit.fuel = Some(fuel);
                }
                other => {
                    return Err(refuse(format!(
                        "unknown limit {other:?}; the limits are memory, timeout and fuel"
                    )));
                }
            }
        }
        if limit.memory_bytes.is_none() && limit.call_timeout.is_none() && limit.fuel.is_none() {
            return Err(refuse(format!("it sets no limit; {form}")));
        }
        Ok(limit)
    }
}

impl fmt::Display for PluginLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut fields = Vec::new();
        if let Some(bytes) = self.memory_bytes {
            fields.push(format!("memory={bytes}"));
        }
        if let Some(timeout) = self.call_timeout {
            fields.push(format!("timeout={}ms", timeout.as_millis()));
        }
        if let Some(fuel) = self.fuel {
            fields.push(format!("fuel={fuel}"));
        }
        write!(f, "{}:{}", self.target, fields.join(","))
    }
}

/// `64MiB`, `64M`, `512KiB`, `1GiB` or a number of bytes. The units are powers of 1024,
/// as memory sizes usually are.
fn parse_bytes(value: &str) -> Result<u64, String> {
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => {
            return Err(format!(
                "memory must be a number of bytes or of KiB, MiB or GiB, not {value:?}"
            ));
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| {
            format!("memory must be a number of bytes or of KiB, MiB or GiB, not {value:?}")
        })
}

/// `30s`, `500ms`, `10m`, `1h`, or a number of seconds. Also the server's flags that
/// take a time.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let problem = || format!("timeout must be a number with ms, s, m or h, not {value:?}");
    let number: u64 = number.parse().map_err(|_| problem())?;
    let millis = match unit.trim() {
        "ms" => Some(number),
        "" | "s" => number.checked_mul(1000),
        "m" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        _ => return Err(problem()),
    };
    millis.map(Duration::from_millis).ok_or_else(problem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_names_a_target_and_any_of_the_three_limits() {
        let limit: PluginLimit = "hostile:memory=64MiB,timeout=30s,fuel=1_000_000_000"
            .parse()
            .expect("valid");
        assert_eq!(
            limit,
            PluginLimit {
                target: "hostile".into(),
                memory_bytes: Some(64 << 20),
                call_timeout: Some(Duration::from_secs(30)),
                fuel: Some(1_000_000_000),
            }
        );
        let partial: PluginLimit = "*: timeout=500ms".parse().expect("valid");
        assert!(partial.is_default());
        assert_eq!(partial.call_timeout, Some(Duration::from_millis(500)));
        let base = Limits::default();
        let changed = base.with(&partial);
        assert_eq!(changed.call_timeout, Duration::from_millis(500));
        assert_eq!(changed.memory_bytes, base.memory_bytes);
        assert_eq!(changed.fuel, None);
        // What Display writes reads back as the same entry.
        assert_eq!(limit.to_string().parse::<PluginLimit>(), Ok(limit));
    }

    #[test]
    fn units_read_as_written() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        let problem = |entry: &str| {
            entry
                .parse::<PluginLimit>()
                .expect_err("refused")
                .to_string()
        };
        assert!(problem("memory=64MiB").contains("no target name"));
        assert!(problem("a b:memory=1M").contains("is not a target name"));
        assert!(problem("x:memory=64MB").contains("KiB, MiB or GiB"));
        assert!(problem("x:memory=8GiB").contains("between 1MiB and 4GiB"));
        assert!(problem("x:timeout=3 days").contains("ms, s, m or h"));
        assert!(problem("x:timeout=0s").contains("more than zero"));
        assert!(problem("x:fuel=lots").contains("whole number"));
        assert!(problem("x:speed=9").contains("unknown limit \"speed\""));
        assert!(problem("x:").contains("sets no limit"));
    }
}
