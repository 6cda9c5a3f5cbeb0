//! The one human-readable duration of configuration: a whole number and a unit.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A duration written with a unit: `250ms`, `5s`, `30m`, `2h`, `5d`. Every duration in the
/// configuration of the service and its adapters is one of these.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

const UNITS: [(&str, u64); 5] = [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)];

impl HumanDuration {
    /// # Errors
    /// A message when the text is not a whole number followed by ms, s, m, h or d.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let invalid = || format!("'{text}' is not a duration such as 500ms, 5s, 30m, 2h or 5d");
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let n: u64 = number.parse().map_err(|_| invalid())?;
        let per = UNITS.iter().find(|(name, _)| *name == unit).map(|(_, millis)| *millis).ok_or_else(invalid)?;
        let millis = n.checked_mul(per).ok_or_else(invalid)?;
        Ok(Self(Duration::from_millis(millis)))
    }

    pub fn get(self) -> Duration {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<HumanDuration> for Duration {
    fn from(value: HumanDuration) -> Self {
        value.0
    }
}

/// The largest unit that writes the duration exactly: `90m`, `250ms`, `0s`.
impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.0.as_millis();
        if millis == 0 {
            return f.write_str("0s");
        }
        let (unit, per) = UNITS.iter().find(|(_, per)| millis.is_multiple_of(u128::from(*per))).copied().unwrap_or(("ms", 1));
        write!(f, "{}{unit}", millis / u128::from(per))
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_parses() {
        for (text, millis) in [("250ms", 250), ("5s", 5000), ("30m", 1_800_000), ("2h", 7_200_000), ("5d", 432_000_000), ("0s", 0)] {
            assert_eq!(HumanDuration::parse(text).unwrap().get(), Duration::from_millis(millis), "{text}");
        }
    }

    #[test]
    fn anything_else_is_refused() {
        for text in ["", "5", "s", "5 parsecs", "-5s", "1.5h", "5S", "99999999999999999999d", "18446744073709551615d"] {
            assert!(HumanDuration::parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn writes_back_what_it_reads() {
        for text in ["250ms", "5s", "90m", "2h", "5d", "0s", "1500ms"] {
            let parsed = HumanDuration::parse(text).unwrap();
            assert_eq!(parsed.to_string(), text);
            assert_eq!(serde_json::to_value(parsed).unwrap(), serde_json::json!(text));
            assert_eq!(serde_json::from_value::<HumanDuration>(serde_json::json!(text)).unwrap(), parsed);
        }
        assert!(serde_json::from_value::<HumanDuration>(serde_json::json!(5)).is_err(), "a bare number has no unit");
    }
}
