//! HTTP/1.1 heads as the gateway reads them, a client's request or a pod's answer alike:
//! bounded in size and in headers, the framing headers read once and checked, the others
//! kept with their values sharing the head's bytes (a copy and an allocation each cost more
//! than the rest of the parse).
use super::framing;
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};

/// The most a head (start line and headers) may take, and a body's trailers.
pub(super) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most headers a head may have.
pub(super) const MAX_HEADERS: usize = 100;

/// Headers that belong to one connection (RFC 9110 §7.6.1), never passed on.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Whether a header belongs to one connection.
pub(super) fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// Where one header's name and value lie in a head, each from start to end.
#[derive(Clone, Copy, Default)]
pub(super) struct Place {
    name: [u32; 2],
    value: [u32; 2],
}

/// Records where `parsed`, headers parsed from `read`, lie in it; returns how many there are.
pub(super) fn place(
    read: &[u8],
    parsed: &[httparse::Header<'_>],
    places: &mut [Place; MAX_HEADERS],
) -> usize {
    // A head is read up to 64 KiB: offsets fit in u32.
    let base = read.as_ptr() as usize;
    let span = |part: &[u8]| {
        let start = part.as_ptr() as usize - base;
        [start as u32, (start + part.len()) as u32]
    };
    for (place, field) in places.iter_mut().zip(parsed) {
        *place = Place {
            name: span(field.name.as_bytes()),
            value: span(field.value),
        };
    }
    parsed.len()
}

/// What a head's headers say.
pub(super) struct Fields {
    /// Those passed on: all but the framing and those that belong to one connection.
    pub headers: HeaderMap,
    pub length: Option<u64>,
    /// The last transfer coding is chunked; any other is refused.
    pub chunked: bool,
    /// `Connection: close`.
    pub close: bool,
    /// `Connection: keep-alive`, HTTP/1.0's way to keep a connection open.
    pub keep_alive: bool,
}

/// The headers at `places` in `bytes`, a head taken whole off the read buffer.
pub(super) fn fields(bytes: &Bytes, places: &[Place]) -> Result<Fields, &'static str> {
    let range = |[start, end]: [u32; 2]| start as usize..end as usize;
    let mut fields = Fields {
        headers: HeaderMap::with_capacity(places.len()),
        length: None,
        chunked: false,
        close: false,
        keep_alive: false,
    };
    for place in places {
        let name =
            HeaderName::from_bytes(&bytes[range(place.name)]).map_err(|_| "invalid header name")?;
        let value = &bytes[range(place.value)];
        if name == header::CONTENT_LENGTH {
            let n = framing::content_length(value)?;
            if fields.length.is_some_and(|m| m != n) {
                return Err("conflicting Content-Length");
            }
            fields.length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            // Only chunked, the last coding, frames a body the gateway reads.
            fields.chunked = value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            if !fields.chunked {
                return Err("a transfer coding other than chunked");
            }
        } else if name == header::CONNECTION {
            for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                fields.close |= token.eq_ignore_ascii_case(b"close");
                fields.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if !is_hop_by_hop(&name) {
            let value = HeaderValue::from_maybe_shared(bytes.slice(range(place.value)))
                .map_err(|_| "invalid header value")?;
            fields.headers.append(name, value);
        }
    }
    Ok(fields)
}
