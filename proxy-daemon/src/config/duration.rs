//! Durations as Istio writes them (Go's time.ParseDuration: "1.5s", "500ms", "3m", "1h30m").
use std::time::Duration;

pub fn parse(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {text:?} (examples: 500ms, 2s, 1m30s)");
    let s = text.trim();
    if s.is_empty() {
        return Err(bad());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_len == 0 {
            return Err(bad());
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * seconds_per;
        rest = &rest[unit_len..];
    }
    // Protobuf's Duration ends at 10,000 years; beyond (or not finite) is a mistake, not a
    // reason to panic.
    if !total.is_finite() || total > MAX_SECONDS {
        return Err(format!(
            "duration {text:?} is too long (at most 10,000 years)"
        ));
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// google.protobuf.Duration's largest value, in seconds.
const MAX_SECONDS: f64 = 315_576_000_000.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_beyond_ten_thousand_years_are_errors_not_panics() {
        for text in ["99999999999999999999h", "18446744073709551615s", "1e400s"] {
            assert!(parse(text).is_err(), "{text}");
        }
        assert_eq!(parse("87600000h").unwrap().as_secs(), 315_360_000_000);
    }

    #[test]
    fn go_style_durations() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("3m"), Ok(Duration::from_secs(180)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert!(parse("5 seconds").is_err());
        assert!(parse("10").is_err());
        assert!(parse("").is_err());
    }
}
