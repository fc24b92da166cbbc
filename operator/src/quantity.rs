//! Kubernetes resource quantities (`500m`, `1.5Gi`, `1e3`) as numbers: what the API server
//! compares and stores, so that `1024Mi` and the `1Gi` it comes back as are one value.

/// The value in billionths (the API server's finest unit, `n`), or `None` for what is not
/// a quantity or does not fit. Finer fractions round up, as the API server rounds them.
pub fn nanos(s: &str) -> Option<i128> {
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || number.len() > 30 {
        return None;
    }
    let (binary, decimal): (u32, i32) = match suffix {
        "Ki" => (10, 0),
        "Mi" => (20, 0),
        "Gi" => (30, 0),
        "Ti" => (40, 0),
        "Pi" => (50, 0),
        "Ei" => (60, 0),
        "n" => (0, -9),
        "u" => (0, -6),
        "m" => (0, -3),
        "" => (0, 0),
        "k" => (0, 3),
        "M" => (0, 6),
        "G" => (0, 9),
        "T" => (0, 12),
        "P" => (0, 15),
        "E" => (0, 18),
        e => {
            let exponent = e.strip_prefix(['e', 'E'])?;
            let digits = exponent.trim_start_matches(['+', '-']);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (0, exponent.parse::<i32>().ok().filter(|e| e.abs() <= 30)?)
        }
    };
    let mantissa: i128 = format!("{whole}{fraction}").parse().ok()?;
    let scale = 9 + decimal - fraction.len() as i32;
    let scaled = mantissa.checked_mul(1i128.checked_shl(binary)?)?;
    let value = if scale >= 0 {
        scaled.checked_mul(10i128.checked_pow(scale as u32)?)?
    } else {
        let divisor = 10i128.checked_pow(scale.unsigned_abs())?;
        (scaled + divisor - 1) / divisor
    };
    Some(if negative { -value } else { value })
}

/// The form the API server stores a quantity in: binary suffixes stay binary while the
/// value is whole (`1024Mi` is `1Gi`), everything else takes the largest decimal suffix
/// that keeps the number whole (`0.5` is `500m`, `1000m` is `1`). `None` if not a quantity.
pub fn canonical(s: &str) -> Option<String> {
    let value = nanos(s)?;
    let (sign, magnitude) = if value < 0 {
        ("-", -value)
    } else {
        ("", value)
    };
    if magnitude == 0 {
        return Some("0".into());
    }
    let binary = s.ends_with('i');
    if binary && magnitude % 1_000_000_000 == 0 {
        let whole = magnitude / 1_000_000_000;
        let (mut n, mut suffix) = (whole, 0);
        while suffix < 6 && n % 1024 == 0 {
            n /= 1024;
            suffix += 1;
        }
        let suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
        return Some(format!("{sign}{n}{}", suffixes[suffix]));
    }
    let suffixes = ["n", "u", "m", "", "k", "M", "G", "T", "P", "E"];
    let (mut n, mut suffix) = (magnitude, 0);
    while suffix < suffixes.len() - 1 && n % 1000 == 0 {
        n /= 1000;
        suffix += 1;
    }
    Some(format!("{sign}{n}{}", suffixes[suffix]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_canonical_forms_follow_the_api_server() {
        assert_eq!(nanos("1Gi"), nanos("1024Mi"));
        assert_eq!(nanos("500m"), nanos("0.5"));
        assert_eq!(nanos("1e3"), nanos("1k"));
        assert_eq!(nanos("1n"), Some(1));
        assert_eq!(nanos("0.1n"), Some(1), "rounds up");
        for bad in ["", "abc", "1X", "1.2.3", "Gi", "1e", "1e+"] {
            assert_eq!(nanos(bad), None, "{bad}");
        }
        for (input, stored) in [
            ("1024Mi", "1Gi"),
            ("1536Mi", "1536Mi"),
            ("1.5Gi", "1536Mi"),
            ("0.5", "500m"),
            ("1000m", "1"),
            ("2000", "2k"),
            ("1500", "1500"),
            ("20Gi", "20Gi"),
            ("256Mi", "256Mi"),
            ("0", "0"),
            ("100m", "100m"),
        ] {
            assert_eq!(canonical(input).as_deref(), Some(stored), "{input}");
        }
    }
}
