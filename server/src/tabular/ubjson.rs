//! Universal Binary JSON (the format of XGBoost's `.ubj` models) read into a JSON value,
//! so one loader serves both files. Every count is checked against the bytes left, so a
//! hostile file cannot make it allocate more than the file's own size.
use serde_json::{Map, Number, Value};

/// Containers nest no deeper than this; XGBoost's models nest five levels.
const MAX_DEPTH: usize = 64;

pub fn parse(bytes: &[u8]) -> Result<Value, String> {
    let mut reader = Reader { bytes, at: 0 };
    let value = reader.value(0)?;
    if reader.at != bytes.len() {
        return Err(format!(
            "{} bytes after the end of the document",
            bytes.len() - reader.at
        ));
    }
    Ok(value)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("truncated at byte {}", self.at))?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("N bytes taken"))
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        let marker = self.byte()?;
        self.typed(marker, depth)
    }

    fn typed(&mut self, marker: u8, depth: usize) -> Result<Value, String> {
        Ok(match marker {
            b'Z' => Value::Null,
            b'T' => Value::Bool(true),
            b'F' => Value::Bool(false),
            b'i' | b'U' | b'I' | b'l' | b'L' => Value::from(self.integer(marker)?),
            b'd' => float(f32::from_be_bytes(self.array()?).into())?,
            b'D' => float(f64::from_be_bytes(self.array()?))?,
            b'C' => Value::String(char::from(self.byte()?).to_string()),
            b'S' | b'H' => Value::String(self.string()?),
            b'[' | b'{' if depth >= MAX_DEPTH => return Err("nested too deeply".into()),
            b'[' => self.list(depth + 1)?,
            b'{' => self.object(depth + 1)?,
            other => {
                return Err(format!(
                    "unknown marker {other:#04x} at byte {}",
                    self.at - 1
                ));
            }
        })
    }

    fn integer(&mut self, marker: u8) -> Result<i64, String> {
        Ok(match marker {
            b'i' => i8::from_be_bytes(self.array()?).into(),
            b'U' => self.byte()?.into(),
            b'I' => i16::from_be_bytes(self.array()?).into(),
            b'l' => i32::from_be_bytes(self.array()?).into(),
            b'L' => i64::from_be_bytes(self.array()?),
            other => return Err(format!("expected a length, found marker {other:#04x}")),
        })
    }

    fn length(&mut self) -> Result<usize, String> {
        let marker = self.byte()?;
        let n = self.integer(marker)?;
        usize::try_from(n).map_err(|_| format!("negative length {n}"))
    }

    fn string(&mut self) -> Result<String, String> {
        let n = self.length()?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "a string is not UTF-8".into())
    }

    /// `$type` and `#count` of an optimised container, when given.
    fn header(&mut self) -> Result<(Option<u8>, Option<usize>), String> {
        let kind = match self.peek() {
            Some(b'$') => {
                self.at += 1;
                match self.byte()? {
                    // Types whose values take no bytes would let a tiny count claim any
                    // number of elements; XGBoost writes none.
                    b'Z' | b'T' | b'F' | b'N' => {
                        return Err("a typed container of values without bytes".into());
                    }
                    marker => Some(marker),
                }
            }
            _ => None,
        };
        let count = match self.peek() {
            Some(b'#') => {
                self.at += 1;
                let n = self.length()?;
                // Every element takes at least one byte (typed ones too, above).
                if n > self.bytes.len() - self.at {
                    return Err(format!("a count of {n} exceeds the bytes left"));
                }
                Some(n)
            }
            _ if kind.is_some() => return Err("a typed container without a count".into()),
            _ => None,
        };
        Ok((kind, count))
    }

    fn element(&mut self, kind: Option<u8>, depth: usize) -> Result<Value, String> {
        match kind {
            Some(marker) => self.typed(marker, depth),
            None => self.value(depth),
        }
    }

    fn list(&mut self, depth: usize) -> Result<Value, String> {
        let (kind, count) = self.header()?;
        let mut items = Vec::with_capacity(count.unwrap_or(0).min(1 << 20));
        match count {
            Some(n) => {
                for _ in 0..n {
                    items.push(self.element(kind, depth)?);
                }
            }
            None => {
                while self.peek() != Some(b']') {
                    items.push(self.value(depth)?);
                }
                self.at += 1;
            }
        }
        Ok(Value::Array(items))
    }

    fn object(&mut self, depth: usize) -> Result<Value, String> {
        let (kind, count) = self.header()?;
        let mut map = Map::new();
        match count {
            Some(n) => {
                for _ in 0..n {
                    let key = self.string()?;
                    map.insert(key, self.element(kind, depth)?);
                }
            }
            None => {
                while self.peek() != Some(b'}') {
                    let key = self.string()?;
                    map.insert(key, self.value(depth)?);
                }
                self.at += 1;
            }
        }
        Ok(Value::Object(map))
    }
}

fn float(v: f64) -> Result<Value, String> {
    Number::from_f64(v)
        .map(Value::Number)
        .ok_or_else(|| format!("a number that JSON cannot hold: {v}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_typed_and_plain_containers() {
        // {"a": [$d#U 2 1.5 -2.0], "b": "hi", "c": [i 1 T]}
        let mut doc = vec![b'{', b'U', 1, b'a', b'[', b'$', b'd', b'#', b'U', 2];
        doc.extend(1.5f32.to_be_bytes());
        doc.extend((-2.0f32).to_be_bytes());
        doc.extend([b'U', 1, b'b', b'S', b'U', 2, b'h', b'i']);
        doc.extend([b'U', 1, b'c', b'[', b'i', 1, b'T', b']', b'}']);
        let v = parse(&doc).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a": [1.5, -2.0], "b": "hi", "c": [1, true]})
        );
    }

    #[test]
    fn hostile_counts_and_truncation_are_errors_not_allocations() {
        let huge = [
            b'[', b'$', b'd', b'#', b'L', 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        assert!(parse(&huge).unwrap_err().contains("exceeds the bytes left"));
        assert!(parse(b"[i").unwrap_err().contains("truncated"));
        assert!(parse(&[b'S', b'i', 0xff]).unwrap_err().contains("negative"));
        let nulls = [b'[', b'$', b'Z', b'#', b'U', 8];
        assert!(parse(&nulls).unwrap_err().contains("without bytes"));
        let deep = vec![b'['; 100];
        assert!(parse(&deep).unwrap_err().contains("deeply"));
    }
}
