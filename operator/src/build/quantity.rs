//! Reads Kubernetes quantities (`16Gi`, `512M`, `1e9`) as bytes, to size probes and volumes.
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Bytes in a quantity, or None when it is not one (the API server validates them, so
/// that is only a value this parser does not know, such as milli-bytes).
pub fn bytes(q: &Quantity) -> Option<u64> {
    let s = q.0.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    Some((number * scale) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_decimal_and_exponent_forms() {
        let b = |s: &str| bytes(&Quantity(s.into()));
        assert_eq!(b("16Gi"), Some(16 << 30));
        assert_eq!(b("1.5Gi"), Some(3 << 29));
        assert_eq!(b("512M"), Some(512_000_000));
        assert_eq!(b("1e9"), Some(1_000_000_000));
        assert_eq!(b("1024"), Some(1024));
        assert_eq!(b("100m"), None);
    }
}
