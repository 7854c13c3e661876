//! Link rates, written the way `tc` and people write them.

use std::fmt;
use std::str::FromStr;

/// A link rate in bits per second.
///
/// Parsed from a number (decimals allowed) and a unit:
///
/// | unit | meaning |
/// |---|---|
/// | `bit`, `kbit`, `mbit`, `gbit`, `tbit` | bits per second, powers of 1000 (any case) |
/// | `B/s`, `kB/s` (or `KB/s`), `MB/s`, `GB/s` | bytes per second, powers of 1000 |
/// | `KiB/s`, `MiB/s`, `GiB/s` | bytes per second, powers of 1024 |
///
/// A bare number and `tc`'s own `kbps`/`mbps` (bytes per second there,
/// bits per second to most readers) are refused rather than guessed.
/// Displays in the largest bit unit that is exact, e.g. `80mbit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(u64);

/// Why a rate did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseRateError {
    #[error("rate {0:?} has no number")]
    NoNumber(String),
    #[error("rate {0:?} has no unit (write e.g. 80mbit or 10MB/s)")]
    NoUnit(String),
    #[error("rate {input:?} has an unknown unit {unit:?} (bit, kbit, mbit, gbit, B/s, kB/s, MB/s, GB/s, KiB/s, MiB/s, GiB/s)")]
    UnknownUnit { input: String, unit: String },
    #[error("rate {0:?} is ambiguous: tc reads kbps as kilobytes per second; write kbit or kB/s")]
    Ambiguous(String),
    #[error("rate {0:?} is below the minimum of {min}", min = Rate::MIN)]
    TooLow(String),
    #[error("rate {0:?} is above the maximum of {max}", max = Rate::MAX)]
    TooHigh(String),
}

impl Rate {
    /// The lowest rate accepted. Below it one full-size frame takes more
    /// than 0.1 s, and the shaper's burst (a few frames at least) dominates
    /// anything one would measure.
    pub const MIN: Rate = Rate(100_000);
    /// The highest rate accepted: far beyond what a veth on one machine
    /// carries, and small enough that every byte count below stays in u64.
    pub const MAX: Rate = Rate(1_000_000_000_000);

    /// A rate of `bits` bits per second, if within [`Rate::MIN`]..=[`Rate::MAX`].
    pub fn from_bits_per_sec(bits: u64) -> Option<Rate> {
        (Self::MIN.0..=Self::MAX.0)
            .contains(&bits)
            .then_some(Rate(bits))
    }

    /// Bits per second.
    pub fn bits_per_sec(self) -> u64 {
        self.0
    }

    /// Bytes per second (rounded down).
    pub fn bytes_per_sec(self) -> u64 {
        self.0 / 8
    }

    /// The rate as `tc` reads it: plain bits per second, no rounding.
    pub(crate) fn tc_arg(self) -> String {
        format!("{}bit", self.0)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, mult) in [
            ("tbit", 1_000_000_000_000u64),
            ("gbit", 1_000_000_000),
            ("mbit", 1_000_000),
            ("kbit", 1_000),
        ] {
            if self.0 >= mult && self.0.is_multiple_of(mult) {
                return write!(f, "{}{unit}", self.0 / mult);
            }
        }
        write!(f, "{}bit", self.0)
    }
}

/// Bits per second for one unit of each spelling.
fn unit_multiplier(unit: &str) -> Option<u64> {
    let bits = match unit.to_ascii_lowercase().as_str() {
        "bit" => Some(1),
        "kbit" => Some(1_000),
        "mbit" => Some(1_000_000),
        "gbit" => Some(1_000_000_000),
        "tbit" => Some(1_000_000_000_000),
        _ => None,
    };
    bits.or(match unit {
        "B/s" => Some(8),
        "kB/s" | "KB/s" => Some(8_000),
        "MB/s" => Some(8_000_000),
        "GB/s" => Some(8_000_000_000),
        "KiB/s" => Some(8 << 10),
        "MiB/s" => Some(8 << 20),
        "GiB/s" => Some(8 << 30),
        _ => None,
    })
}

impl FromStr for Rate {
    type Err = ParseRateError;

    fn from_str(input: &str) -> Result<Rate, ParseRateError> {
        let s = input.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = (&s[..split], s[split..].trim_start());
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
            return Err(ParseRateError::NoNumber(input.to_owned()));
        }
        if unit.is_empty() {
            return Err(ParseRateError::NoUnit(input.to_owned()));
        }
        let lower = unit.to_ascii_lowercase();
        if lower.ends_with("bps") {
            return Err(ParseRateError::Ambiguous(input.to_owned()));
        }
        let mult = unit_multiplier(unit).ok_or_else(|| ParseRateError::UnknownUnit {
            input: input.to_owned(),
            unit: unit.to_owned(),
        })?;

        // Exact decimal arithmetic: "1.5gbit" is 1_500_000_000 bit/s, not
        // whatever a float makes of it.
        let too_high = || ParseRateError::TooHigh(input.to_owned());
        let digits = |d: &str| -> Result<u128, ParseRateError> {
            if d.is_empty() {
                Ok(0)
            } else if d.len() > 30 {
                Err(too_high())
            } else {
                d.parse::<u128>().map_err(|_| too_high())
            }
        };
        let frac = &frac[..frac.len().min(18)];
        let scale = 10u128.pow(frac.len() as u32);
        // At most 18 fractional digits times a multiplier below 2^43: no
        // overflow in u128.
        let part = digits(frac)? * mult as u128 / scale;
        let bits = digits(int)?
            .checked_mul(mult as u128)
            .and_then(|whole| whole.checked_add(part))
            .ok_or_else(too_high)?;
        if bits > Rate::MAX.0 as u128 {
            return Err(too_high());
        }
        Rate::from_bits_per_sec(bits as u64).ok_or_else(|| ParseRateError::TooLow(input.to_owned()))
    }
}

impl serde::Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(s: &str) -> u64 {
        s.parse::<Rate>().unwrap().bits_per_sec()
    }

    #[test]
    fn parses_bit_units() {
        assert_eq!(bits("80mbit"), 80_000_000);
        assert_eq!(bits("1gbit"), 1_000_000_000);
        assert_eq!(bits("500kbit"), 500_000);
        assert_eq!(bits("1.5Gbit"), 1_500_000_000);
        assert_eq!(bits(" 40 mbit "), 40_000_000);
        assert_eq!(bits("2000000bit"), 2_000_000);
        assert_eq!(bits(".5gbit"), 500_000_000);
    }

    #[test]
    fn parses_byte_units() {
        assert_eq!(bits("10MB/s"), 80_000_000);
        assert_eq!(bits("1MiB/s"), 8 * 1024 * 1024);
        assert_eq!(bits("250kB/s"), 2_000_000);
        assert_eq!(bits("1GB/s"), 8_000_000_000);
    }

    #[test]
    fn refuses_bad_input() {
        use ParseRateError::*;
        let err = |s: &str| s.parse::<Rate>().unwrap_err();
        assert!(matches!(err(""), NoNumber(_)));
        assert!(matches!(err("mbit"), NoNumber(_)));
        assert!(matches!(err("."), NoNumber(_)));
        assert!(matches!(err("1.2.3mbit"), NoNumber(_)));
        assert!(matches!(err("80"), NoUnit(_)));
        assert!(matches!(err("80 furlongs"), UnknownUnit { .. }));
        assert!(matches!(err("10mb/s"), UnknownUnit { .. }));
        assert!(matches!(err("80kbps"), Ambiguous(_)));
        assert!(matches!(err("0mbit"), TooLow(_)));
        assert!(matches!(err("99kbit"), TooLow(_)));
        assert!(matches!(err("2tbit"), TooHigh(_)));
        assert!(matches!(
            err("99999999999999999999999999999999999gbit"),
            TooHigh(_)
        ));
        assert!(matches!(err("-5mbit"), NoNumber(_)));
    }

    #[test]
    fn displays_in_largest_exact_unit() {
        for (input, shown) in [
            ("80mbit", "80mbit"),
            ("1gbit", "1gbit"),
            ("1.5gbit", "1500mbit"),
            ("1500kbit", "1500kbit"),
            ("10MB/s", "80mbit"),
            ("1MiB/s", "8388608bit"),
        ] {
            let rate: Rate = input.parse().unwrap();
            assert_eq!(rate.to_string(), shown);
            assert_eq!(rate.to_string().parse::<Rate>().unwrap(), rate);
        }
    }

    #[test]
    fn serde_round_trip_as_string() {
        let rate: Rate = "40mbit".parse().unwrap();
        let json = serde_json::to_string(&rate).unwrap();
        assert_eq!(json, "\"40mbit\"");
        assert_eq!(serde_json::from_str::<Rate>(&json).unwrap(), rate);
        assert!(serde_json::from_str::<Rate>("\"40\"").is_err());
    }
}
